"""Whether CUDA's batched matmuls with out_dtype (bf16 operands, fp32 result and accumulation in
place) work in this torch and how they compare with TF32 on fp32 copies, at the talking-heads
backward's shapes (16 heads, a chunk of 1024 rows by 3072 keys, D=128)."""
import torch
import triton

print(torch.__version__)
torch.backends.cuda.matmul.fp32_precision = "tf32"
H, R, K, D = 16, 1024, 3072, 128
ds16, a16 = (torch.randn(H, R, K, device="cuda", dtype=torch.bfloat16) for _ in range(2))
q16, do16 = (torch.randn(H, R, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
ds32, q32 = ds16.float(), q16.float()
acc = torch.zeros(H, K, D, device="cuda")
try:
    torch.baddbmm(acc, ds16.transpose(-1, -2), q16, out_dtype=torch.float32, out=acc)
    expect = torch.bmm(ds32.transpose(-1, -2).double(), q32.double())
    print("baddbmm out_dtype in place: max error", (acc.double() - expect).abs().max().item(),
          "of", expect.abs().max().item())
    t16 = triton.testing.do_bench(lambda: torch.baddbmm(acc, ds16.transpose(-1, -2), q16, out_dtype=torch.float32,
                                                        out=acc), return_mode="median")
    dq = torch.empty(H, R, D, device="cuda")
    k16 = torch.randn(H, K, D, device="cuda", dtype=torch.bfloat16)
    tq16 = triton.testing.do_bench(lambda: torch.bmm(ds16, k16, out_dtype=torch.float32, out=dq), return_mode="median")
    print(f"dk-like: bf16 with fp32 out {t16:.3f} ms; dq-like {tq16:.3f} ms")
except Exception as e:      # noqa: BLE001 (report whatever this torch says)
    print("out_dtype failed:", type(e).__name__, str(e)[:300])
t32 = triton.testing.do_bench(lambda: acc.baddbmm_(ds32.transpose(-1, -2), q32), return_mode="median")
print(f"dk-like: TF32 on fp32 {t32:.3f} ms")
