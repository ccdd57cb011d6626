"""Models: shapes, the layer-map forward (weight sharing), and the analytic FLOPs against PyTorch's counter."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from apollo_lm.config import ModelConfig
from apollo_lm.models import build_model
from apollo_lm.train.flops import forward_flops_per_token, train_step_flops


def tiny(family, n_layer=3, **kw):
    return ModelConfig(family=family, n_layer=n_layer, n_embd=32, n_head=4, vocab_size=101, block_size=16, **kw)


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_shapes_and_loss(family):
    torch.manual_seed(0)
    m = build_model(tiny(family))
    x = torch.randint(0, 101, (2, 16))
    logits, loss = m(x, x)
    assert logits.shape == (2, 16, 101)
    assert abs(loss.item() - torch.log(torch.tensor(101.0)).item()) < 0.5  # near uniform at init
    with pytest.raises(ValueError, match="position table"):
        m(torch.randint(0, 101, (1, 17)))


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_layer_map_forward_is_weight_sharing(family):
    torch.manual_seed(0)
    m = build_model(tiny(family)).eval()
    x = torch.randint(0, 101, (2, 16))
    default, _ = m(x)
    explicit, _ = m(x, layer_map=[0, 1, 2])
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    shared, _ = m(x, layer_map=[0, 0, 1, 1, 2, 2])  # each block run twice in a row
    # the same network built explicitly with copied blocks
    deep = build_model(tiny(family, n_layer=6)).eval()
    sd = {k: v for k, v in m.state_dict().items() if not k.startswith("blocks.")}
    for t, i in enumerate([0, 0, 1, 1, 2, 2]):
        sd.update({f"blocks.{t}.{k}": v for k, v in m.blocks[i].state_dict().items()})
    deep.load_state_dict(sd, strict=False)
    if family == "gpt":
        deep.lm_head.weight = deep.wte.weight
    torch.testing.assert_close(shared, deep(x)[0])


@pytest.mark.parametrize("family", ["gpt", "bert"])
@pytest.mark.parametrize("lmap", [None, [0, 0, 1, 2, 2]])
def test_analytic_flops_match_flop_counter(family, lmap):
    """method.md's 3 x (2 N_active + 4 D T d) per token equals PyTorch's count within 5 %."""
    cfg = ModelConfig(family=family, n_layer=3, n_embd=64, n_head=4, vocab_size=512, block_size=64)
    m = build_model(cfg)
    B, T = 2, 64
    x = torch.randint(0, 512, (B, T))
    # the math attention backend decomposes into matmuls the counter sees (the fused CPU kernel is not counted)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        _, loss = m(x, x, layer_map=lmap)
        loss.backward()
    depth = len(lmap) if lmap else 3
    ours = train_step_flops(m, depth, T, B * T)
    assert abs(fc.get_total_flops() / ours - 1) < 0.05, (fc.get_total_flops(), ours)
    assert forward_flops_per_token(m, depth, T) > forward_flops_per_token(m, depth - 1, T)


@pytest.mark.parametrize("family", ["gpt", "bert", "llama"])
def test_block_traces_as_one_graph(family):
    """--compile compiles each block on its own; a graph break would split it and cost speed on a GPU."""
    m = build_model(tiny(family, n_layer=1))
    x = torch.randn(2, 16, 32)
    if family == "llama":
        from apollo_lm.models.llama import rotary_tables
        args = (x, *rotary_tables(16, 8, m.config.rope_theta, x.device, x.dtype))
    else:
        args = (x, None) if family == "bert" else (x,)
    e = torch._dynamo.explain(m.blocks[0])(*args)
    assert (e.graph_count, e.graph_break_count) == (1, 0), e.break_reasons
    if family != "bert":  # --repeat-scale uses passes the branch scale as a 0-d tensor: one graph, no break
        e = torch._dynamo.explain(m.blocks[0])(*args, x.new_full((), 0.25))
        assert (e.graph_count, e.graph_break_count) == (1, 0), e.break_reasons
