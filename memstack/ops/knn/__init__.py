"""Nearest-neighbour search and top-k memory attention: `reference.py` (obvious, loops / full
matrices) beside `torch_fast.py` (streamed, batched, GQA-folded). Both run on CPU and GPU."""
from memstack.ops.knn.reference import knn_search_ref, topk_attention_diff_ref, topk_attention_ref
from memstack.ops.knn.torch_fast import knn_search, topk_attention

__all__ = ["knn_search", "knn_search_ref", "topk_attention", "topk_attention_ref", "topk_attention_diff_ref"]
