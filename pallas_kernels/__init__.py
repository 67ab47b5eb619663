"""Pallas kernels, each beside its plain-jnp reference and a vectorised XLA path.

`ragged_paged_attention`: queries of a flat ragged batch attend causally to their request's KV
pages. See `ragged_paged_attention/common.py` for the KV page layout and the shared signature.
`grouped_matmul`: the MoE experts' GEMM, rows sorted by group times one weight matrix per group.
"""
