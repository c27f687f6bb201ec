"""Retrieval: a frozen CLIP bi-encoder, a sharded memory bank, ScaNN search, the paper's
selection rules, batch neighbor precomputation and an HTTP service.

    clip.py           the Flax CLIP (ViT + text tower), ClipConfig sizes
    clip_weights.py   Hugging Face safetensors <-> Flax params
    clip_tokenizer.py hashed-word / byte / BPE text tokenizers
    clip_train.py     the train_retriever run mode (contrastive, built-in corpus)
    encoder.py        DocumentEncoder: texts, images, documents -> unit vectors
    memory_bank.py    vectors + doc ids + token ids on disk, in shards
    index.py          ScaNN build / save / load / search; ShardedIndex
    select.py         relevance, near-duplicate, modality and redundancy rules
    retriever.py      Retriever: search by text, image or vector (in process)
    neighbors.py      every training document's neighbors, precomputed
    build.py          the build_retrieval run mode
    server.py         the FastAPI service and the serve_retrieval run mode
    client.py         RetrievalClient: the Retriever's methods over HTTP
    load_generator.py concurrent loopback clients against the service (load tests)
    synthetic_vectors.py  clustered unit vectors that look like embeddings (benchmarks)

Modules are imported by name (nothing here), so `import cm3leon_jax.retrieval`
stays light and TensorFlow (pulled in by scann) loads only when an index is used.
"""
