"""Text generation: top-k / top-p filtering, greedy decoding through the target-depth layer map, seeded
sampling, cropping to the trained context, and a clear error for BERT."""

import json

import pytest
import torch

from apollo_lm.config import ModelConfig
from apollo_lm.eval.evaluate import load_run
from apollo_lm.eval.generate import filter_logits, generate, generate_from_run
from apollo_lm.models import build_model

from .conftest import TINY, run_cli


@pytest.fixture(scope="module")
def runs(tmp_path_factory, docs):
    """A GPT run stopped in its first growth stage (2 of 4 blocks) and a BERT run, trained a few steps."""
    root = tmp_path_factory.mktemp("gen")
    train = root / "train.jsonl"
    train.write_text("\n".join(json.dumps({"text": d}) for d in docs[:600]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APOLLO_CACHE", str(root / "cache"))
        common = [*TINY, "--data", str(train), "--valid-fraction", "0.1"]
        # the paper's unscaled repeats: generation runs the physical blocks through the target-depth map
        assert run_cli("train", *common, "--n-layer", "4", "--method", "apollo", "--stages", "2,4",
                       "--grow-at", "0.5", "--steps", "4", "--stop-after", "2", "--repeat-scale", "none",
                       "--out", str(root / "gpt")) == 0
        assert run_cli("train", *common, "--model", "bert", "--steps", "1", "--out", str(root / "bert")) == 0
    return root


def test_filter_logits():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.96)).all()
    shuffled = logits[:, [2, 0, 3, 1]]  # the nucleus follows the values, not the positions
    assert torch.isfinite(filter_logits(shuffled, top_p=0.7)).tolist() == [[False, True, False, True]]


def test_greedy_is_argmax_and_crops_to_context():
    cfg = ModelConfig(family="llama", n_layer=2, n_embd=32, n_head=4, vocab_size=50, block_size=8)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    start = torch.tensor([[1, 2, 3]])
    out = generate(model, start, 12, temperature=0.0)  # runs past block_size: the context is cropped
    assert out.shape == (1, 15) and out[0, :3].tolist() == [1, 2, 3]
    for t in range(3, 15):
        context = out[:, max(0, t - 8):t]
        assert out[0, t] == model(context)[0][0, -1].argmax()


def test_seeded_sampling_is_reproducible_and_stops_at_eot():
    cfg = ModelConfig(family="gpt", n_layer=1, n_embd=16, n_head=2, vocab_size=5, block_size=16)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    start = torch.zeros(4, 1, dtype=torch.long)

    def sample(seed):
        return generate(model, start, 10, 1.0, generator=torch.Generator().manual_seed(seed), stop_token=4)

    a, b = sample(7), sample(7)
    assert torch.equal(a, b)
    for row in a.tolist():  # after the stop token a row only repeats it
        if 4 in row[1:]:
            first = row.index(4, 1)
            assert set(row[first:]) == {4}


def test_generate_from_run_uses_target_depth(runs):
    texts = generate_from_run(runs / "gpt", "The", max_new_tokens=8, temperature=0.0, num_samples=2)
    assert len(texts) == 2 and texts[0] == texts[1] and texts[0].startswith("The")
    run = load_run(runs / "gpt")
    assert run.target_map == [0, 0, 1, 1]
    eot = run.tokenizer.token_to_id("<|endoftext|>")
    start = torch.tensor([[eot] + run.tokenizer.encode("The").ids])
    out = generate(run.model, start, 8, 0.0, layer_map=run.target_map, stop_token=eot)[0, start.size(1):].tolist()
    out = out[:out.index(eot)] if eot in out else out
    assert texts[0] == "The" + run.tokenizer.decode(out)


def test_cli_generate_and_errors(runs, capsys):
    assert run_cli("generate", str(runs / "gpt"), "--prompt", "Python", "--max-new-tokens", "5", "--top-k", "20",
                   "--top-p", "0.9", "--seed", "3") == 0
    assert capsys.readouterr().out.startswith("Python")
    assert run_cli("generate", str(runs / "bert"), "--prompt", "x") == 2
    err = capsys.readouterr().err
    assert "BERT" in err and err.count("\n") == 1
    assert run_cli("generate", str(runs / "gpt"), "--top-p", "1.5") == 2
    assert "--top-p" in capsys.readouterr().err
