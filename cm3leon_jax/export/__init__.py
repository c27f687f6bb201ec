"""Checkpoints out of and into this project.

    params_export  the `export` run mode: a training checkpoint -> a params-only export
                   (`train/params_checkpoint.py`: orbax params + manifest, any mesh),
                   and `write_export`, which every import ends with.
    hf_export      the `transformers` layout as safetensors: OPTForCausalLM (CM3Leon)
                   or ChameleonForConditionalGeneration (+ its VQ model and tokenizer).
    hf_import      that layout back into a params-only export.
    chameleon_release  the original Chameleon release (params.json, consolidated*.pth,
                   tokenizer/vqgan.ckpt, vqgan.yaml, text_tokenizer.json) -> an export.
    chameleon_vocab    Chameleon's text tokenizer and token ids mapped onto our `IdLayout`.
    hf_tokenizer   our vocabulary as `transformers` tokenizer files (in our ids).
    import_run     the `import_weights` run mode: any known layout -> an export.
"""
