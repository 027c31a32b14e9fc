"""TAR: the entropy objective, the tamper-resistance weights, an outer gradient equal to a hand
computation (attack with torch's AdamW, ∇ of minus the entropy at the attacked weights,
restore, retain CE + hidden-state distance), and the inner loop leaves the outer weights and the
trainer's optimizer untouched until the outer step. The reference setup: TAR trains a fresh
adapter on the plain SFT alignment (cached as `defense: sft` caches it; the aligned model is
base → SFT → TAR, merged), on benign retain rows, with the distance taken to that start; each
loss term at weight 0 skips its work."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from defense_helpers import (
    Cycle,
    autograd_of,
    lora_model,
    make_trainer,
    step_keeping_earlier_grads,
    token_batch,
)

from hftlab.config import ConfigError, LoraConfig, TrainConfig, load_config
from hftlab.context import RunContext
from hftlab.data.spec import DataSpec
from hftlab.defenses import DEFENSES
from hftlab.defenses.tar import CPU_PRESET, entropy_loss, tamper_weights
from hftlab.model import attach_trainable, causal_lm_parts
from hftlab.pipeline import run_stage, stage_align
from hftlab.stage_models import aligned_model
from hftlab.train import IGNORE_INDEX, SFTTrainer, supervised_loss

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
# small attack, benign demo rows for x_r (the default Alpaca rows need a data_root)
TAR_ARGS = "{inner_steps: 2, tr_every: 1, retain_data: {kind: demo_sentiment, n: 12}}"


def tar(**options):
    return DEFENSES.get("tar")(**options)


def test_entropy_loss_matches_hand_computation() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0], [0.0, 0.0, -1e4]])
    h_uniform = math.log(3)
    h_skewed = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))  # p = (1/2, 1/4, 1/4)
    h_two = math.log(2)  # the third class has probability ~0
    want = -(h_uniform + h_skewed + h_two) / 3
    assert entropy_loss(logits).item() == pytest.approx(want, abs=1e-6)
    # minimising it spreads the distribution: the gradient lowers the largest logit
    x = logits[1:2].clone().requires_grad_(True)
    entropy_loss(x).backward()
    assert x.grad[0, 0] > 0 and x.grad[0, 1] < 0


def test_tamper_weights_follow_the_reference_schedule() -> None:
    # training.py: grad_scale * exp(λ (i - (K - 1))) / num_tasks where (i + 1) % subsample == 0
    w = tamper_weights(64, 4, 4.0, "schedule", 0.0625)
    assert sorted(w) == list(range(3, 64, 4))
    assert w[63] == pytest.approx(4.0)
    assert w[3] == pytest.approx(4.0 * math.exp(-0.0625 * 60))
    uniform = tamper_weights(8, 2, 4.0, "uniform", 0.0625, tasks=2)
    assert uniform == {i: pytest.approx(4.0 / 8 / 2) for i in (1, 3, 5, 7)}
    assert list(tamper_weights(2, 4, 4.0, "schedule", 0.0625)) == [1]  # tr_every > K: last


def hand_tamper(model, adversary, heldout, lr, tamper_weight=4.0, lam=0.0625):
    """TAR's tamper-resistance gradient, recomputed from the full model's logits; the weights
    are put back afterwards."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.01)
    k = len(adversary)
    tamper = {n: torch.zeros_like(p) for n, p in params.items()}
    for i, adv in enumerate(adversary):
        grads = autograd_of(model, supervised_loss(model, adv))
        for n, p in params.items():
            p.grad = grads[n]
        optimizer.step()
        for p in params.values():
            p.grad = None
        logits = model(input_ids=heldout.input_ids, attention_mask=heldout.attention_mask).logits
        answer = logits[:, :-1][heldout.labels[:, 1:] != IGNORE_INDEX]
        probs = answer.softmax(-1)
        entropy = -(probs * probs.log()).sum(-1).mean()
        weight = tamper_weight * math.exp(lam * (i - (k - 1)))
        for n, g in autograd_of(model, -entropy).items():
            tamper[n] += weight * g
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    return tamper


def hand_distance(hidden, start_hidden, mask) -> torch.Tensor:
    mask = mask.float()
    return torch.stack([((h - f).norm(dim=-1) * mask).sum() / mask.sum()
                        for h, f in zip(hidden, start_hidden)]).mean()


def hand_retain(model, batch, representation_weight=1.0):
    """∇ [CE + representation_weight · D] on x_r, D to the adapters-off model."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                output_hidden_states=True)
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(),
                         ignore_index=IGNORE_INDEX)
    with torch.no_grad(), model.disable_adapter():
        frozen = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       output_hidden_states=True).hidden_states
    distance = hand_distance(out.hidden_states, frozen, batch.attention_mask)
    return autograd_of(model, ce + representation_weight * distance)


def hand_tar(model, batch, adversary, heldout, lr):
    """TAR's outer gradient, every piece recomputed from the full model's logits."""
    tamper = hand_tamper(model, adversary, heldout, lr)
    retain = hand_retain(model, batch)
    return {n: tamper[n] + retain[n] for n in tamper}


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_tar_gradient_matches_hand_computation(tiny_lora, grad_accum) -> None:
    defense = tar(inner_steps=2, tr_every=1, adversary_lrs=[1e-2])
    trainer = make_trainer(tiny_lora, defense, grad_accum=grad_accum)
    defense.setup("alignment", trainer)
    batch = token_batch(4, seed=1)
    adversary = [token_batch(4, seed=2), token_batch(4, seed=3)]
    heldout = token_batch(5, seed=4)
    defense.adversary, defense.heldout = Cycle(*adversary), Cycle(heldout)
    stats, got, earlier = step_keeping_earlier_grads(defense, trainer, tiny_lora, batch)
    assert stats["attack_shift"] > 0 and stats["representation_distance"] > 0
    expected = hand_tar(tiny_lora, batch, adversary, heldout, lr=1e-2)
    assert set(got) == set(expected)
    for name, value in expected.items():
        want = earlier[name] + value / grad_accum
        assert torch.allclose(got[name], want, atol=1e-6, rtol=1e-5), name


def test_inner_loop_leaves_outer_weights_and_optimizer_untouched(tiny_lora) -> None:
    defense = tar(inner_steps=3, tr_every=1, adversary_lrs=[5e-2])
    trainer = make_trainer(tiny_lora, defense)
    params = trainer.trainable_parameters()
    trainer.optimizer = torch.optim.AdamW(params, lr=1e-3)
    for p in params:  # give the outer optimizer some state
        p.grad = torch.ones_like(p)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    state = {id(p): {k: v.clone() for k, v in s.items()}
             for p, s in trainer.optimizer.state.items()}
    groups = [{k: v for k, v in g.items() if k != "params"}
              for g in trainer.optimizer.param_groups]
    before = {n: p.detach().clone() for n, p in tiny_lora.named_parameters()}
    defense.setup("alignment", trainer)

    seen = []  # weights as the adversary's batches are drawn: they do move inside the loop
    stream = defense.adversary

    class Watch:
        def next(self):
            seen.append(torch.cat([p.detach().flatten().clone() for p in params]))
            return stream.next()

    defense.adversary = Watch()
    stats = defense.training_step("alignment", trainer, token_batch(4, seed=1))

    for n, p in tiny_lora.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed before the outer step"
        assert (p.grad is not None) == p.requires_grad
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()
    assert len(seen) == 3 and not torch.equal(seen[0], seen[-1])
    assert stats["attack_shift"] > 0
    assert len(trainer.optimizer.state) == len(state)
    for p, s in trainer.optimizer.state.items():
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]), "the trainer's optimizer state changed"
    assert [{k: v for k, v in g.items() if k != "params"}
            for g in trainer.optimizer.param_groups] == groups


def test_full_finetuning_keeps_a_frozen_copy(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = attach_trainable(model, TrainConfig(method="full"))
    defense = tar(inner_steps=2, tr_every=1, adversary_lrs=[1e-2])
    trainer = make_trainer(model, defense)
    defense.setup("alignment", trainer)
    assert defense.frozen is not None and defense.frozen is not model
    assert not any(p.requires_grad for p in defense.frozen.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = defense.training_step("alignment", trainer, token_batch(4, seed=1))
    assert stats["representation_distance"] == 0.0  # still at the frozen weights
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    lora = attach_trainable(model, TrainConfig(lora=LoraConfig(r=2, alpha=4)))
    trainer = make_trainer(lora, defense)
    defense.setup("alignment", trainer)
    assert defense.frozen is None  # LoRA: the adapters are switched off instead


def test_tar_defaults_and_validation() -> None:
    o = tar().options
    # run_tar_bio.sh / tar.py: --tar_inner_loop_steps 64, --adversary_lr_samples 2e-6,2e-5,4e-5,
    # --tar_inner_loop_subsample 4, --tar_tamper_resistance_loss_type max_entropy,
    # --tar_tamper_resistance_grad_scale 4.0, --use_weighting_schedule --schedule_lambda 0.0625,
    # --tar_retain_scale 1.0, --retain_representations, --tar_num_tasks_sampled 1,
    # --tar_adversary_batch_size 4; dataloaders.py holds out 20 % (test_size=0.20) for x_tr
    assert (o.inner_steps, o.adversary_lrs, o.tr_every, o.tr_loss) == (
        64, [2e-6, 2e-5, 4e-5], 4, "entropy")
    assert (o.tamper_weight, o.weighting, o.schedule_lambda) == (4.0, "schedule", 0.0625)
    assert (o.retain_weight, o.representation_weight, o.tasks_per_step) == (1.0, 1.0, 1)
    assert (o.adversary_batch_size, o.tr_batch_size, o.heldout_fraction) == (4, None, 0.2)
    # the reference's setup: a safeguarded start, benign retain rows
    assert o.start == "sft" and tar().alignment_start() == "sft"
    assert tar(start="base").alignment_start() == "base"
    assert o.retain_data == DataSpec(kind="refusal", path="alpaca/alpaca_data_safety_only.json",
                                     offset=400, n=200)
    assert tar(retain_data=None).options.retain_data is None
    assert tar(retain_data={"n": 50}).options.retain_data.n == 50  # merged into the default
    assert DEFENSES.get("tar").needs_provider_harmful
    assert DEFENSES.get("tar").stages == ("alignment",)
    preset = tar(**CPU_PRESET).options
    assert (preset.inner_steps, preset.tr_every) == (4, 2)
    with pytest.raises(ConfigError, match="inner_step"):
        tar(inner_step=3)  # unknown option
    with pytest.raises(ConfigError, match="same prompt"):
        tar(tr_loss="dpo")
    with pytest.raises(ConfigError, match="tr_loss.*entropy"):
        tar(tr_loss="max_logit")
    with pytest.raises(ConfigError, match="weighting"):
        tar(weighting="linear")
    with pytest.raises(ConfigError, match="start.*sft, base"):
        tar(start="aligned")
    for bad in ({"inner_steps": 0}, {"tr_every": 0}, {"adversary_lrs": []},
                {"adversary_lrs": [1e-5, -1.0]}, {"heldout_fraction": 1.0},
                {"tamper_weight": -1.0}, {"tr_batch_size": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            tar(**bad)


def test_tar_holds_out_harmful_rows_for_the_tamper_loss(tiny_lora) -> None:
    defense = tar()
    trainer = make_trainer(tiny_lora, defense)  # 12 harmful rows
    defense.setup("alignment", trainer)
    held, adv = defense.heldout.items, defense.adversary.items
    assert (len(held), len(adv)) == (2, 10)  # round(0.2 · 12)
    assert not {id(x) for x in held} & {id(x) for x in adv}
    assert defense.heldout.batch_size == trainer.cfg.batch_size
    assert defense.adversary.batch_size == 4


def test_tar_reference_settings_name_real_keys_and_match_the_defaults() -> None:
    from hftlab.defense_settings import check_key, option_default

    cls = DEFENSES.get("tar")
    for setting in cls.reference_settings:
        check_key(cls, setting.key)
        assert setting.source and setting.note, setting.key
    options = {s.key.split(".", 1)[1]: s.reference for s in cls.reference_settings
               if s.key.startswith("defense_args.")}
    # every option is listed; all but the start and the retain set are the reference's values
    assert set(options) == {f.name for f in dataclasses.fields(cls.Options)}
    for name, reference in options.items():
        if name not in ("start", "retain_data"):
            assert option_default(cls, name) == reference, name


def tar_overrides(tiny_overrides: list[str], *extra: str) -> list[str]:
    return [*tiny_overrides, "defense=tar", f"defense_args={TAR_ARGS}",
            "provider_harmful={kind: demo_harmful_qa, n: 16}", "alignment.train.max_steps=2",
            "finetune.train.max_steps=2", *extra]


def align(overrides: list[str], run_dir: Path) -> tuple[RunContext, dict]:
    """The alignment stage of a run alone (its stage.json is written)."""
    config = load_config(None, overrides)
    ctx = RunContext(config, run_dir)
    return ctx, run_stage(ctx, "align", stage_align, config.seed + 1)


@pytest.fixture
def trainings(monkeypatch) -> list[str]:
    """The defense of every training stage run, in order."""
    seen: list[str] = []
    train = SFTTrainer.train

    def counted(self, *args, **kwargs):
        seen.append(self.defense.name)
        return train(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "train", counted)
    return seen


def adapter(cache: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(cache / "model" / "adapter_model.safetensors"))


def hand_merged(model: torch.nn.Module, *adapters: Path) -> torch.nn.Module:
    """``model`` with each saved LoRA's scale · B · A added to its weights, in order."""
    from safetensors.torch import load_file

    state = {k: v.clone() for k, v in model.state_dict().items()}
    for folder in adapters:
        config = json.loads((folder / "adapter_config.json").read_text())
        scale = config["lora_alpha"] / config["r"]
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        for name, a in tensors.items():
            if ".lora_A." in name:
                b = tensors[name.replace(".lora_A.", ".lora_B.")]
                target = name.removeprefix("base_model.model.").replace(".lora_A.", ".")
                state[target] += scale * (b @ a)
    model.load_state_dict(state)
    return model


def test_tar_trains_on_the_sft_alignment_and_shares_it(tiny_overrides, tmp_path,
                                                       trainings) -> None:
    tar_ctx, info = align(tar_overrides(tiny_overrides), tmp_path / "tar")
    assert trainings == ["sft", "tar"]  # no start in the cache: trained first
    assert info["sft_start"]["cached"] is False
    assert not (tmp_path / "tar" / "align" / "sft_start").exists()  # its checkpoints
    # a plain sft run of the same alignment config finds it: the start is keyed as sft keys it
    sft_ctx, sft = align([*tiny_overrides, "defense=sft", "alignment.train.max_steps=2"],
                         tmp_path / "sft")
    assert trainings == ["sft", "tar"] and sft["cached"] is True
    assert sft["key"] == tar_ctx.alignment_key(start=True) == info["sft_start"]["key"]
    start_meta = json.loads((Path(sft["cache"]) / "meta.json").read_text())
    assert start_meta["defense"] is None and start_meta["defense_report"] == {}
    # ... and holds what the sft run trains itself (in a cache of its own)
    _, own = align([*tiny_overrides, "defense=sft", "alignment.train.max_steps=2",
                    f"cache_dir={tmp_path / 'own'}"], tmp_path / "sft_own")
    assert trainings[-1] == "sft" and own["key"] == sft["key"]
    assert adapter(Path(own["cache"])).keys() == adapter(Path(sft["cache"])).keys()
    for name, value in adapter(Path(own["cache"])).items():
        assert torch.equal(value, adapter(Path(sft["cache"]))[name]), name
    meta = json.loads((Path(info["cache"]) / "meta.json").read_text())
    assert meta["starts_from"] == info["starts_from"] == sft["cache"]
    # another TAR run reuses the cached start: only TAR trains
    _, other = align(tar_overrides(tiny_overrides, "defense_args.tamper_weight=2.0"),
                     tmp_path / "tar2")
    assert trainings == ["sft", "tar", "sft", "tar"] and other["sft_start"]["cached"] is True
    assert other["starts_from"] == sft["cache"] and other["key"] != info["key"]
    # the aligned model: base, then the SFT adapter merged, then TAR's (checked by hand)
    ids = torch.tensor([[5, 17, 42, 9, 77, 3, 11]])
    start, tar_model = Path(sft["cache"]) / "model", Path(info["cache"]) / "model"
    with torch.no_grad():
        got = aligned_model(tar_ctx)(input_ids=ids).logits
        want = hand_merged(tar_ctx.base_model(), start, tar_model)(input_ids=ids).logits
        sft_only = hand_merged(tar_ctx.base_model(), start)(input_ids=ids).logits
        tar_only = hand_merged(tar_ctx.base_model(), tar_model)(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert (got - sft_only).abs().max() > 1e-4 and (got - tar_only).abs().max() > 1e-4


def test_tar_key_holds_its_start_and_start_base_is_the_old_setup(tiny_overrides, tmp_path,
                                                                  trainings) -> None:
    def context(*extra: str) -> RunContext:
        return RunContext(load_config(None, tar_overrides(tiny_overrides, *extra)),
                          tmp_path / "run")

    ctx, fewer = context(), context("alignment.data.n=12")
    # TAR trains on the same retain rows; the refusal rows reach it through its start only
    assert [e.prompt for e in ctx.data.alignment] == [e.prompt for e in fewer.data.alignment]
    assert ctx.alignment_key(start=True) != fewer.alignment_key(start=True)
    assert ctx.alignment_key() != fewer.alignment_key()
    base_ctx, info = align(tar_overrides(tiny_overrides, "defense_args.start=base"),
                           tmp_path / "base")
    assert base_ctx.alignment_key() != ctx.alignment_key()
    assert trainings == ["tar"] and "starts_from" not in info and "sft_start" not in info
    ids = torch.tensor([[5, 17, 42, 9, 77, 3, 11]])
    with torch.no_grad():
        got = aligned_model(base_ctx)(input_ids=ids).logits
        want = hand_merged(base_ctx.base_model(), Path(info["cache"]) / "model")(
            input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_default_retain_rows_are_benign_alpaca_and_need_a_data_root(tiny_overrides,
                                                                   tmp_path) -> None:
    overrides = [*tiny_overrides, "defense=tar", "provider_harmful={kind: demo_harmful_qa, n: 16}"]
    ctx = RunContext(load_config(None, overrides), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"retain_data of 'tar'.*data_root is not set"):
        ctx.data  # noqa: B018  (loading the run's data raises)
    if not (SHARED_DATA / "alpaca" / "alpaca_data_safety_only.json").is_file():
        pytest.skip("no ../shared/data here")
    ctx = RunContext(load_config(None, [*overrides, f"data_root={SHARED_DATA}"]),
                     tmp_path / "run")
    rows = ctx.data.alignment
    refusals = ctx.load(ctx.config.alignment.data)
    assert len(rows) == 200 and all(r.response and not r.is_harmful for r in rows)
    assert rows[0].source.endswith("alpaca_data_safety_only.json")
    assert not {r.prompt for r in rows} & {r.prompt for r in refusals}
    assert ctx.defense.prepare_data("finetune", refusals, ctx) == refusals
    assert DEFENSES.get("tar")(retain_data=None).prepare_data("alignment", refusals, ctx) \
        == refusals


def test_distance_is_to_the_stage_start_model(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    start = lora_model(tiny_model_dir).merge_and_unload()  # a safeguarded start: base + SFT
    reference = copy.deepcopy(start)
    model = attach_trainable(start, TrainConfig(lora=LoraConfig(r=4, alpha=8)))  # B = 0
    defense = tar(inner_steps=1, tr_every=1, adversary_lrs=[1e-2])
    trainer = make_trainer(model, defense)
    defense.setup("alignment", trainer)
    batch = token_batch(4, seed=1)
    # first step: the fresh adapter adds exactly nothing, so the distance is exactly 0
    assert defense.training_step("alignment", trainer, batch)["representation_distance"] == 0.0
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    stats = defense.training_step("alignment", trainer, batch)

    def hidden(m):
        with torch.no_grad():
            return m(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     output_hidden_states=True).hidden_states

    want = hand_distance(hidden(model), hidden(reference), batch.attention_mask)
    assert stats["representation_distance"] == pytest.approx(want.item(), rel=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    to_base = hand_distance(hidden(model), hidden(base), batch.attention_mask)
    assert abs(to_base.item() - want.item()) > 1e-3  # the start, not the base model


@pytest.mark.parametrize("off", [None, "tamper_weight", "retain_weight",
                                 "representation_weight"])
def test_a_weight_of_zero_skips_its_term(tiny_lora, off) -> None:
    defense = tar(inner_steps=2, tr_every=1, adversary_lrs=[1e-2], **({off: 0.0} if off else {}))
    trainer = make_trainer(tiny_lora, defense)
    defense.setup("alignment", trainer)
    batch = token_batch(4, seed=1)
    adversary, heldout = [token_batch(4, seed=2), token_batch(4, seed=3)], token_batch(5, seed=4)
    defense.adversary, defense.heldout = Cycle(*adversary), Cycle(heldout)
    calls = []  # (grad enabled, hidden states asked, adapters on) per forward of the body
    body, _ = causal_lm_parts(tiny_lora)
    lora_layer = next(m for m in tiny_lora.modules() if hasattr(m, "lora_A"))
    hook = body.register_forward_pre_hook(lambda module, args, kwargs: calls.append((
        torch.is_grad_enabled(), bool(kwargs.get("output_hidden_states")),
        not lora_layer.disable_adapters)), with_kwargs=True)
    try:
        _, got, earlier = step_keeping_earlier_grads(defense, trainer, tiny_lora, batch)
    finally:
        hook.remove()
    attack = [(True, False, True)] * 4  # 2 adversary steps, each with an x_tr forward
    retain = [(True, True, True), (False, True, False)]  # x_r, then the stage start on it
    expected = {None: attack + retain, "tamper_weight": retain,
                "retain_weight": [*attack, (False, False, True)],  # the logged loss only
                "representation_weight": [*attack, (True, False, True)]}[off]
    assert calls == expected
    assert defense.adversary.calls == (0 if off == "tamper_weight" else 2)
    tamper = ({n: torch.zeros_like(p) for n, p in tiny_lora.named_parameters() if p.requires_grad}
              if off == "tamper_weight" else hand_tamper(tiny_lora, adversary, heldout, lr=1e-2))
    retain_grad = (dict.fromkeys(tamper, 0.0) if off == "retain_weight" else
                   hand_retain(tiny_lora, batch, 0.0 if off == "representation_weight" else 1.0))
    for name in tamper:
        want = earlier[name] + tamper[name] + retain_grad[name]
        assert torch.allclose(got[name], want, atol=1e-6, rtol=1e-5), name


def test_tar_runs_the_pipeline(tiny_overrides, tmp_path) -> None:
    from hftlab.pipeline import run_pipeline

    config = load_config(None, tar_overrides(tiny_overrides))
    metrics = run_pipeline(config, tmp_path / "run")
    assert all(math.isfinite(c[k]) for c in metrics["curves"]
               for k in ("task_loss", "alignment_loss", "harmful_loss"))
    align_info = json.loads((tmp_path / "run" / "align" / "stage.json").read_text())
    report = align_info["defense_report"]
    assert align_info["defense"]["options"]["inner_steps"] == 2
    assert align_info["starts_from"] == align_info["sft_start"]["cache"]
    assert math.isfinite(report["harmful_loss_after_attack_last"])
    assert report["attack_shift_first"] > 0
    # the first step: a fresh adapter on the start, so no distance to it on the retain rows
    assert report["representation_distance_first"] == 0.0
    data = json.loads((tmp_path / "run" / "data" / "stage.json").read_text())
    assert data["counts"]["alignment"] == 12  # the stage trains on the retain rows
