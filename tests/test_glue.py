"""GLUE fine-tuning: the metrics against their definitions, the TSV layouts (CoLA without a header, MRPC with a
byte-order mark and bare quotes), a head that learns a separable task for BERT and Llama, the real GLUE files
end to end on a small slice, and one-line errors."""

import json
from pathlib import Path

import numpy as np
import pytest

from apollo_lm.eval.evaluate import load_run
from apollo_lm.eval.glue import TASKS, encode, f1, matthews, pearson, read_split, spearman

from .conftest import TINY, run_cli

GLUE = Path("/work/shared/data/glue")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, docs):
    """Tiny BERT and Llama runs trained for two steps."""
    root = tmp_path_factory.mktemp("glue")
    train = root / "train.jsonl"
    train.write_text("\n".join(json.dumps({"text": d}) for d in docs[:400]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APOLLO_CACHE", str(root / "cache"))
        for family in ("bert", "llama"):
            assert run_cli("train", *TINY, "--model", family, "--steps", "2", "--data", str(train),
                           "--valid-fraction", "0.1", "--out", str(root / family)) == 0
    return root


def test_metrics_match_their_definitions():
    pred, gold = np.array([1, 1, 0, 0, 1, 0]), np.array([1, 0, 0, 1, 1, 0])
    tp, tn, fp, fn = 2, 2, 1, 1
    assert f1(pred, gold) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert matthews(pred, gold) == pytest.approx((tp * tn - fp * fn) / np.sqrt(3 * 3 * 3 * 3))
    assert matthews(np.ones(4), np.array([1, 0, 1, 0])) == 0.0  # a constant prediction carries no signal
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = x + rng.normal(size=50)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    ties = np.array([1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 4.0])
    other = np.array([2.0, 1.0, 3.0, 3.0, 6.0, 4.0, 5.0])
    scipy_stats = pytest.importorskip("scipy.stats")
    assert spearman(ties, other) == pytest.approx(scipy_stats.spearmanr(ties, other).statistic)
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)  # rank correlation ignores monotone transforms


def test_tsv_layouts(tmp_path):
    (tmp_path / "CoLA").mkdir()
    (tmp_path / "CoLA" / "train.tsv").write_text("gj04\t1\t\tThe sailors rode.\ngj04\t0\t*\tRode the the.\n")
    (tmp_path / "MRPC").mkdir()
    (tmp_path / "MRPC" / "train.tsv").write_text(
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tHe said \" hi .\tHe said hi .\n"
        "0\t3\t4\tA\n", encoding="utf-8")  # the last row is truncated: skipped
    cola = read_split(tmp_path, TASKS["CoLA"], "train")
    assert [(e.a, e.label) for e in cola] == [("The sailors rode.", 1.0), ("Rode the the.", 0.0)]
    mrpc = read_split(tmp_path, TASKS["MRPC"], "train")
    assert [(e.a, e.b, e.label) for e in mrpc] == [('He said " hi .', "He said hi .", 1.0)]


def test_encoding_bert_pairs_and_causal_last_token(runs):
    from apollo_lm.eval.glue import Example

    ex = [Example("a b c d e f g h", "i j k l", 1.0), Example("short", None, 0.0)]
    bert = load_run(runs / "bert")
    enc = encode(bert.tokenizer, "bert", ex, 10)
    ids = enc["input_ids"]
    cls, sep = bert.tokenizer.token_to_id("[CLS]"), bert.tokenizer.token_to_id("[SEP]")
    assert ids.shape[1] == 10 and ids[0, 0] == cls and (ids[0] == sep).sum() == 2  # truncated longest first
    first_sep, second_sep = (ids[0] == sep).nonzero()[:, 0].tolist()
    assert enc["token_type_ids"][0].tolist().count(1) == second_sep - first_sep  # segment B: b and its [SEP]
    assert enc["attention_mask"][1].sum() < 10 and ids[1, enc["attention_mask"][1].sum() - 1] == sep
    llama = load_run(runs / "llama")
    enc = encode(llama.tokenizer, "llama", ex, 64)
    eot = llama.tokenizer.token_to_id("<|endoftext|>")
    last = enc["attention_mask"].sum(1) - 1
    assert enc["input_ids"][0, last[0]] == eot and enc["input_ids"][1, last[1]] == eot


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_finetuning_learns_a_separable_task(family, runs, tmp_path, capsys):
    """Sentences with 'good' vs 'bad': the classification head reaches full dev accuracy."""
    rng = np.random.default_rng(0)
    words = ["the", "film", "was", "plot", "and", "a", "very", "quite", "story", "it"]

    def rows(n):
        out = []
        for _ in range(n):
            label = int(rng.integers(2))
            s = [*rng.choice(words, 3), *["good" if label else "bad"] * 2]
            rng.shuffle(s)
            out.append(f"{' '.join(s)}\t{label}")
        return "sentence\tlabel\n" + "\n".join(out) + "\n"

    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text(rows(96))
    (tmp_path / "SST-2" / "dev.tsv").write_text(rows(32))
    assert run_cli("glue", str(runs / family), "--task", "sst2", "--data-dir", str(tmp_path), "--epochs", "8",
                   "--lr", "3e-3", "--batch-size", "16", "--dropout", "0", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tasks"]["SST-2"]["metrics"]["accuracy"] >= 90.0, result["tasks"]


@pytest.mark.skipif(not GLUE.is_dir(), reason="GLUE data not available")
def test_all_tasks_end_to_end_on_a_slice(runs, capsys):
    assert run_cli("glue", str(runs / "bert"), "--task", "all", "--data-dir", str(GLUE), "--max-train", "64",
                   "--max-eval", "32", "--epochs", "1", "--batch-size", "32", "--max-len", "32", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["tasks"]) == ["CoLA", "SST-2", "MRPC", "STS-B", "RTE"]
    expected = {"CoLA": {"matthews"}, "SST-2": {"accuracy"}, "MRPC": {"f1", "accuracy"},
                "STS-B": {"pearson", "spearman"}, "RTE": {"accuracy"}}
    for name, r in result["tasks"].items():
        assert set(r["metrics"]) == expected[name]
        assert r["train_examples"] == 64 and r["dev_examples"] == 32 and r["steps"] == 2
        assert all(-100.0 <= v <= 100.0 for v in r["metrics"].values())
        assert r["score"] == pytest.approx(np.mean(list(r["metrics"].values())))
    assert result["average"] == pytest.approx(np.mean([r["score"] for r in result["tasks"].values()]))
    # the table form for people
    assert run_cli("glue", str(runs / "llama"), "--task", "RTE", "--data-dir", str(GLUE), "--max-train", "32",
                   "--max-eval", "16", "--epochs", "1", "--max-len", "32") == 0
    assert "RTE" in capsys.readouterr().out


def test_bad_input(runs, tmp_path, capsys):
    def error(*args):
        assert run_cli("glue", str(runs / "bert"), *args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        return err

    assert "unknown GLUE task 'QQP'" in error("--task", "QQP", "--data-dir", str(tmp_path))
    assert "does not exist" in error("--task", "RTE", "--data-dir", str(tmp_path / "nowhere"))
    assert "RTE/train.tsv is missing" in error("--task", "RTE", "--data-dir", str(tmp_path))
    (tmp_path / "RTE").mkdir()
    for split in ("train", "dev"):
        (tmp_path / "RTE" / f"{split}.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    assert run_cli("glue", str(tmp_path), "--task", "RTE", "--data-dir", str(tmp_path)) == 2
    assert "not a run directory" in capsys.readouterr().err


@pytest.mark.skipif(not GLUE.is_dir(), reason="GLUE data not available")
def test_bench_glue_side_by_side(runs, tmp_path, capsys):
    """bench/glue.py: two runs, two seeds, one table; the per-run scores are the seeds' means."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_glue", Path(__file__).parents[1] / "bench" / "glue.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "glue"
    assert bench.main([str(runs / "bert"), str(runs / "llama"), "--task", "MRPC", "--data-dir", str(GLUE),
                       "--seeds", "1", "2", "--max-train", "32", "--max-eval", "16", "--epochs", "1",
                       "--max-len", "32", "--out", str(out)]) == 0
    result = json.loads((out / "glue.json").read_text())
    assert list(result["runs"]) == ["bert", "llama"]
    for r in result["runs"].values():
        seeds = [r["seeds"][s]["MRPC"] for s in ("1", "2")]
        scores = [np.mean(list(m.values())) for m in seeds]
        assert r["tasks"]["MRPC"]["score"] == pytest.approx(np.mean(scores))
        assert r["tasks"]["MRPC"]["spread"] == pytest.approx(max(scores) - min(scores))
    table = (out / "glue.md").read_text().splitlines()
    assert table[0] == "| task | bert | llama |" and table[2].startswith("| MRPC | ")
    assert bench.main([str(runs / "bert"), "--task", "MRPC", "--data-dir", str(tmp_path / "none"),
                       "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
