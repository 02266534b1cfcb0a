"""Retrieval memory: a datastore outside the model, read at every site -- kNN-LM (LOGITS),
Memorizing Transformer (ATTN), RETRO (BLOCK) and RAG (the context). Heavy dependencies (faiss,
sentence-transformers, bm25s) are imported only by the code paths that use them."""
