"""Row slabs of the (B, H, L, L) MTA tensors: chunking, row kernels and matmuls the row-chunked
paths (talking_heads/, mta/) share."""
