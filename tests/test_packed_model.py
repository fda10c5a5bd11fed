"""Packed documents through the layer and the model: each document is its own sequence."""
import torch

from mta_kernels.nn import MTATransformer, MTATransformerConfig
from mta_kernels.nn.layer import document_positions

CONFIG = MTATransformerConfig(vocab_size=23, dim=32, n_layers=3, n_heads=4, conv=(3, 5), ffn_hidden_dim=32)


def _model(backend):
    torch.manual_seed(0)
    model = MTATransformer(CONFIG, backend=backend).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "conv" in name or "mix" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def test_document_positions_restart():
    assert document_positions(torch.tensor([0, 3, 4, 8]), 8).tolist() == [0, 1, 2, 0, 0, 1, 2, 3]


def test_packed_model_equals_each_document_alone():
    offsets = [0, 1, 6, 19, 30]
    tokens = torch.randint(0, 23, (1, 30), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor(offsets, dtype=torch.int32)
    for backend in ("reference", "fused"):
        model = _model(backend)
        packed = model(tokens, cu_seqlens=cu)
        alone = torch.cat([model(tokens[:, s:e]) for s, e in zip(offsets, offsets[1:])], dim=1)
        assert (packed - alone).abs().max().item() < 1e-9, backend


def test_packed_loss_skips_the_next_documents_first_token():
    offsets = [0, 7, 20]
    tokens = torch.randint(0, 23, (1, 20), generator=torch.Generator().manual_seed(2))
    model = _model("reference")
    loss = model.loss(tokens, cu_seqlens=torch.tensor(offsets))
    per_doc = [torch.nn.functional.cross_entropy(model(tokens[:, s:e])[0, :-1], tokens[0, s + 1:e], reduction="sum")
               for s, e in zip(offsets, offsets[1:])]
    assert abs(loss.item() - (sum(per_doc) / (20 - 2)).item()) < 1e-5
