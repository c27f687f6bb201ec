"""Decoding: the sampling loop over the KV cache, logits processors and generation APIs.

    sampler.py       prefill + `lax.while_loop`, one jit; left-padded batches; per-row stop
    processors.py    temperature, top-k, top-p, modality constraints, CFG, CD-K
    prompts.py       text->image / image->text prompts, unconditional twins, retrieval
    generate.py      Generator.text_to_image / image_to_text, SamplingConfig
    rerank.py        best-of-N by CLIP score (the paper's re-ranking)
    restore.py       a trained decoder's params from a trainer's MODEL_DIR
    generate_run.py  the `generate` run mode (gin_configs/runs/generate.gin)
    generate_families.py  the SFT families' requests in that run mode (a JSONL file)
    pictures.py      picture grids for people: images in rows, captions under them
"""
