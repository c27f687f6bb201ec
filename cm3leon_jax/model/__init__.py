"""The decoder, and the partitioning rules every network shares.

Modules (each one idea; import them directly, this package imports nothing so that
`partitioning` stays usable without the decoder):

    partitioning  meshes `(data, fsdp, tensor)`, gin-bound logical-axis rules, shardings,
                  `with_logical_constraint` for activations. Imports nothing of ours.
    config        `DecoderConfig`: sizes and the CM3Leon / Chameleon switches (gin).
    norms         LayerNorm / RMSNorm as functions with a one-pass hand-written backward.
    layers        the norm module, bias-free projections, MLP (GELU or SwiGLU), embeddings
                  and the tied output projection (hand-written backward), RoPE, and the
                  optional row / column embeddings of image codes (`image_code_places`).
    attention     attention, the kernel seam (`register_kernel`: xla, cudnn, a TPU splash
                  kernel) and the KV cache.
    attention_chunked  the "chunked" kernel: causal query chunks, FlashAttention-style
                  backward by hand (the fastest on a CPU).
    decoder       `Decoder` (scanned blocks, remat), `init_cache`, `count_params`.
    decode_step   `DecoderStep`: the decode path the sampler calls (layers unstacked once,
                  per-layer KV cache updated in place).
    loss          cross-entropy (fused softmax backward) with loss weights and z-loss;
                  `decoder_loss` on a batch.
    hf_weights    `to_hf` / `from_hf` for `transformers` OPT and Chameleon state dicts.
    cpu_kernels   C++ kernels as XLA FFI custom calls (`cpu_kernels.cc`): FlashAttention
                  for training and the decode step's memory-bound parts.

Flax style (flax 0.12.8). Linen modules; parameters are created with
`nn.with_logical_partitioning`, so the variables carry logical names
(`partitioning.logical_axes(variables)` reads them) and `nn.scan` adds the `layers`
axis to the stacked ones. Activations are constrained with our own
`partitioning.with_logical_constraint`, not flax's: flax's version reads rules from a
`nn.logical_axis_rules` context, which would be a second source of truth beside the
gin-bound rules; ours reads the gin rules and the mesh set by `jax.set_mesh`, and is
a no-op without one (single-device runs need no mesh at all).
"""
