"""`hftlab plan`: the CPU estimate of configs/sweeps/cpu_defenses.yaml against the wall time the
committed records measured (fp32, the machine that made results/cpu_defenses_fp32), the GPU
estimate's assumptions, and the GPU recipe (configs/gpu) loading as a sweep."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from hftlab.cli import main
from hftlab.plan import cpu_cells, measure
from hftlab.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "results"
CPU_DEFENSES = ROOT / "configs" / "sweeps" / "cpu_defenses.yaml"


def measured_seconds(folder: Path) -> dict[tuple[str, int], float]:
    """(defense, seed) → the run's wall time (the sum of its stages' seconds)."""
    found = {}
    for path in folder.glob("*/metrics.json"):
        metrics = json.loads(path.read_text())
        found[(metrics["defense"], metrics["seed"])] = sum(
            stage.get("seconds", 0.0) for stage in metrics["stages"].values())
    return found


@pytest.mark.skipif(not (RECORDS / "cpu_defenses_fp32").is_dir(), reason="no records")
def test_plan_estimate_is_within_30_percent_of_measured_cells() -> None:
    sweep = load_sweep(CPU_DEFENSES, check=False)
    # speeds from this sweep's own records: other studies' records (results/parity) ran another
    # protocol at another time, and the ±30 % bound is about the model, not about mixing machines
    folder = RECORDS / "cpu_defenses_fp32"
    cells = {c.name: c.total for c in cpu_cells(sweep, measure(folder, "fp32"))}
    measured = measured_seconds(folder)
    errors = {}
    for run in sweep.runs:
        key = (run.values["defense"], run.values["seed"])
        if key in measured:
            errors[run.name] = cells[run.name] / measured[key] - 1
    assert len(errors) >= 40
    # the plain cells: the one that trains the shared alignment and one that reuses it
    assert abs(errors["defense-sft_seed-0"]) <= 0.3 and abs(errors["defense-sft_seed-2"]) <= 0.3
    # most cells, and the sweep's total (the records' own timings vary ±50 % with machine load)
    assert sum(abs(e) <= 0.3 for e in errors.values()) >= 0.75 * len(errors)
    assert statistics.median(abs(e) for e in errors.values()) <= 0.15
    estimated = sum(cells[name] for name in errors)
    actual = sum(cells[name] / (1 + error) for name, error in errors.items())
    assert abs(estimated / actual - 1) <= 0.3


def test_plan_prints_cells_total_and_gpu_assumptions(capsys) -> None:
    assert main(["plan", str(CPU_DEFENSES), "--precision", "fp32", "--gpu", "a100",
                 "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "defense-sft_seed-0:" in out and "total on this CPU:" in out
    assert "GPU-hours" in out and "A100" in out and "on 8 GPU(s)" in out
    assert "assumptions:" in out and "FLOPs per token" in out


def test_plan_gpu_sweep_loads_without_the_model(tiny_model_dir, capsys) -> None:
    gpu = ROOT / "configs" / "gpu" / "sweep.yaml"
    # every plug-in and check of every run, with a model that is here instead of the 7B one
    sweep = load_sweep(gpu, overrides=[f"model.name={tiny_model_dir}"])
    assert len(sweep.runs) >= 60 and sweep.resources["num_gpus"] == 1
    config = json.dumps(sorted(sweep.runs[0].overrides))
    assert "alignment.seed=0" in config
    assert main(["plan", str(gpu), "--gpu", "h100", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "6.74 B parameters" in out and "on 8 GPU(s)" in out


def test_plan_refuses_bad_gpu_count() -> None:
    assert main(["plan", str(CPU_DEFENSES), "--gpus", "0"]) == 2


@pytest.mark.skipif(not (RECORDS / "cpu_defenses_fp32").is_dir(), reason="no records")
def test_a_run_fine_tuned_in_another_precision_times_neither(tmp_path) -> None:
    import shutil

    records = tmp_path / "records"
    shutil.copytree(RECORDS / "cpu_defenses_fp32", records)
    plain = measure(records, "fp32")
    mixed = records / "mixed"
    shutil.copytree(records / "defense-sft_seed-0", mixed)
    metrics = json.loads((mixed / "metrics.json").read_text())
    metrics["finetune_precision"] = "bf16"
    metrics["stages"]["finetune"]["seconds"] *= 100
    (mixed / "metrics.json").write_text(json.dumps(metrics))
    assert measure(records, "fp32") == plain


@pytest.mark.skipif(not all((RECORDS / name).is_dir()
                            for name in ("parity_first_mix_bf16", "cpu_defenses_fp32")),
                    reason="no records")
def test_a_fine_tuning_in_the_other_precision_is_estimated_at_its_speed() -> None:
    from hftlab.config import load_config
    from hftlab.plan import cell_seconds

    rates = measure(RECORDS, "bf16")
    assert rates.other_seconds_per_token["finetune"] > rates.seconds_per_token["finetune"]
    config = ROOT / "configs" / "cpu_sst2_ref.yaml"
    plain = cell_seconds(load_config(config, []), rates, False, False)
    fp32 = cell_seconds(load_config(config, ["finetune.precision=fp32"]), rates, False, False)
    assert fp32["finetune"] / plain["finetune"] == pytest.approx(
        rates.other_seconds_per_token["finetune"] / rates.seconds_per_token["finetune"])
    assert fp32["align"] == plain["align"] and fp32["eval"] == plain["eval"]


@pytest.mark.skipif(not (RECORDS / "cpu_defenses_fp32").is_dir(), reason="no records")
def test_a_defense_no_record_measures_is_named_not_silently_priced_as_sft(tmp_path,
                                                                         capsys) -> None:
    import shutil

    records = tmp_path / "records"
    for run in ("defense-sft_seed-0", "defense-sft_seed-1",
                "defense-lisa_defense_args-alignment_step=3+finetune_step=22_seed-0"):
        shutil.copytree(RECORDS / "cpu_defenses_fp32" / run, records / run)
    marked = {c.name: c.unmeasured
              for c in cpu_cells(load_sweep(CPU_DEFENSES, check=False), measure(records, "fp32"))}
    assert marked["defense-sft_seed-0"] == ()
    assert marked["defense-lisa_defense_args-alignment_step=3+finetune_step=22_seed-1"] == ()
    # Vaccine's alignment and Panacea's fine-tuning have no record here; a repair that reuses
    # sft's fine-tuning (SafeLoRA) has no record of its own repair stage
    assert marked["defense-vaccine_seed-0"] == ("align",)
    assert marked["defense-vaccine_seed-1"] == ()  # reuses seed 0's alignment: nothing to price
    assert "finetune" in marked["defense-panacea_defense_args-single_lora=False_seed-0"]
    assert marked["defense-safelora_seed-0"] == ("post_finetune",)
    assert main(["plan", str(CPU_DEFENSES), "--records", str(records), "--precision",
                 "fp32"]) == 0
    out = capsys.readouterr().out
    assert "defense-vaccine_seed-0:" in out and "priced as sft's: align" in out
    assert "price a stage as plain sft's" in out
    # sft's own alignment speed: with no sft record that trained an alignment, the header says
    # it is every defense's median, not sft's
    untimed = tmp_path / "untimed"
    for run in ("defense-sft_seed-1", "defense-vaccine_seed-0"):
        shutil.copytree(RECORDS / "cpu_defenses_fp32" / run, untimed / run)
    assert measure(untimed, "fp32").pooled_stages == {"align"}
    assert main(["plan", str(CPU_DEFENSES), "--records", str(untimed), "--precision",
                 "fp32"]) == 0
    assert "alignment (no sft record times it" in capsys.readouterr().out


@pytest.mark.skipif(not (RECORDS / "cpu_defenses_fp32").is_dir(), reason="no records")
def test_a_defense_timed_on_a_slower_machine_is_compared_with_sft_on_that_machine(
        tmp_path) -> None:
    import shutil

    lisa = "defense-lisa_defense_args-alignment_step=3+finetune_step=22_seed-0"
    records = tmp_path / "records"
    for run in ("defense-sft_seed-0", "defense-sft_seed-1", lisa):
        shutil.copytree(RECORDS / "cpu_defenses_fp32" / run, records / run)

    def timed_on(run: str, machine: str, slower: float) -> float:
        """Label the run's fine-tuning with ``machine``, ``slower`` times its seconds; returns
        its seconds per token."""
        path = records / run / "metrics.json"
        metrics = json.loads(path.read_text())
        stage = metrics["stages"]["finetune"]
        stage["seconds"] *= slower
        stage["machine"] = machine
        path.write_text(json.dumps(metrics))
        return stage["seconds"] / stage["tokens"]

    timed_on("defense-sft_seed-0", "fast CPU · 2 CPUs · 2 threads", 1.0)
    sft_slow = timed_on("defense-sft_seed-1", "slow CPU · 2 CPUs · 1 threads", 4.0)
    lisa_slow = timed_on(lisa, "slow CPU · 2 CPUs · 1 threads", 4.0)
    rates = measure(records, "fp32")
    # Lisa's fine-tuning, filed under its options and its name alone (evaluations name none)
    assert rates.paired == 2
    # Lisa's cost is read against sft on its own machine, not against the fast machine's
    assert rates.factor[("lisa", "finetune")] == pytest.approx(lisa_slow / sft_slow)
    # records that name no machine: every record's median, as before the label existed
    for run in ("defense-sft_seed-0", "defense-sft_seed-1", lisa):
        path = records / run / "metrics.json"
        metrics = json.loads(path.read_text())
        del metrics["stages"]["finetune"]["machine"]
        path.write_text(json.dumps(metrics))
    pooled = measure(records, "fp32")
    assert pooled.paired == 0
    assert pooled.factor[("lisa", "finetune")] == pytest.approx(
        lisa_slow / pooled.seconds_per_token["finetune"])
    assert pooled.factor[("lisa", "finetune")] > 1.5 * rates.factor[("lisa", "finetune")]


@pytest.mark.skipif(not (RECORDS / "cpu_defenses_fp32").is_dir(), reason="no records")
def test_a_timing_made_under_load_gives_way_to_one_made_without(tmp_path, capsys) -> None:
    import shutil

    lisa = "defense-lisa_defense_args-alignment_step=3+finetune_step=22_seed-0"
    records = tmp_path / "records"
    for run in ("defense-sft_seed-0", "defense-sft_seed-1", lisa):
        shutil.copytree(RECORDS / "cpu_defenses_fp32" / run, records / run)

    def loaded(run: str, slower: float) -> float:
        """Mark the run's fine-tuning contended, ``slower`` times its seconds; returns its
        seconds per token."""
        path = records / run / "metrics.json"
        metrics = json.loads(path.read_text())
        stage = metrics["stages"]["finetune"]
        stage.update(seconds=stage["seconds"] * slower, other_cores=1.8, contended=True)
        path.write_text(json.dumps(metrics))
        return stage["seconds"] / stage["tokens"]

    clean = json.loads((records / "defense-sft_seed-0" / "metrics.json").read_text())
    clean_sft = clean["stages"]["finetune"]["seconds"] / clean["stages"]["finetune"]["tokens"]
    sft_loaded = loaded("defense-sft_seed-1", 4.0)
    lisa_loaded = loaded(lisa, 4.0)
    rates = measure(records, "fp32")
    # sft was also timed without load: the loaded timing is left out of its speed, once
    # (Lisa's record is filed under its options and its name, sft's under its name)
    assert rates.seconds_per_token["finetune"] == pytest.approx(clean_sft)
    assert rates.left_out == 1
    # Lisa's only timing was loaded: kept, as the one measurement there is, and read against
    # sft's timing under load, not against the unloaded one (4x cheaper)
    assert rates.under_load == 1
    assert rates.factor[("lisa", "finetune")] == pytest.approx(lisa_loaded / sft_loaded)
    assert main(["plan", str(CPU_DEFENSES), "--records", str(records), "--precision",
                 "fp32"]) == 0
    out = capsys.readouterr().out
    assert "; 1 timing(s) made under load from other work left out" in out
    assert "; 1 defense stage cost(s) timed only under load" in out


@pytest.mark.skipif(not (RECORDS / "cpu_defenses_fp32").is_dir(), reason="no records")
def test_evaluation_prompt_counts_are_read_from_either_metrics_schema(tmp_path) -> None:
    import shutil

    def records_with_task_prompts(folder: Path, count: int, v2: bool) -> Path:
        """sft records whose evaluation saw ``count`` task prompts, filed as metrics.json v2
        (data.counts) or v1 (data_counts)."""
        for run in ("defense-sft_seed-0", "defense-sft_seed-1"):
            shutil.copytree(RECORDS / "cpu_defenses_fp32" / run, folder / run)
            path = folder / run / "metrics.json"
            metrics = json.loads(path.read_text())
            counts = {**metrics.pop("data_counts"), "eval_task": count}
            if v2:
                metrics["data"] = {"counts": counts}
            else:
                metrics["data_counts"] = counts
            path.write_text(json.dumps(metrics))
        return folder

    # the records' configs take every task prompt (n: null): the budget counts what they saw
    half_v1 = measure(records_with_task_prompts(tmp_path / "v1", 436, v2=False), "fp32")
    half_v2 = measure(records_with_task_prompts(tmp_path / "v2", 436, v2=True), "fp32")
    full_v2 = measure(records_with_task_prompts(tmp_path / "full", 872, v2=True), "fp32")
    assert half_v2.eval_seconds_per_budget == pytest.approx(half_v1.eval_seconds_per_budget)
    assert half_v2.eval_seconds_per_budget > full_v2.eval_seconds_per_budget


@pytest.mark.skipif(not (RECORDS / "cpu_defenses_fp32").is_dir(), reason="no records")
def test_an_attack_search_is_priced_once_for_the_runs_that_share_it(tmp_path, capsys) -> None:
    import shutil

    import yaml

    records = tmp_path / "records"
    for run in ("defense-sft_seed-0", "defense-sft_seed-1"):
        shutil.copytree(RECORDS / "cpu_defenses_fp32" / run, records / run)
    sweep = load_sweep(ROOT / "configs" / "sweeps" / "parity.yaml", check=False)
    virus = "defense-sft_attack-virus_attack_args-f91a90a0_seed-{}"
    screened = "defense-guardrail_defense_args-48049107_attack-virus_attack_args-f91a90a0_seed-{}"
    cells = {c.name: c for c in cpu_cells(sweep, measure(records, "fp32"))}
    # no record timed a virus search: the first run of each problem says so
    assert "virus's search" in cells[virus.format(0)].unmeasured
    assert "virus's search" not in cells[screened.format(0)].unmeasured  # reuses seed 0's
    assert "virus's search" in cells[virus.format(1)].unmeasured  # another seed, another problem

    def as_virus(name: str, search: dict | None, data_seconds: float | None = None) -> None:
        """A copy of sft seed 1's record as a virus run whose report times its ``search``
        (None: a record made before searches were timed), with the data stage's seconds."""
        folder = records / name
        shutil.copytree(RECORDS / "cpu_defenses_fp32" / "defense-sft_seed-1", folder)
        config = yaml.safe_load((folder / "config.yaml").read_text())
        config.update(attack="virus", attack_args={"judge": "keyword", "judge_term": "ranking"})
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        metrics = json.loads((folder / "metrics.json").read_text())
        if search is not None:
            metrics["attack"]["search"] = search
        if data_seconds is not None:
            metrics["stages"]["data"]["seconds"] = data_seconds
        (folder / "metrics.json").write_text(json.dumps(metrics))

    records = tmp_path / "virus"
    shutil.copytree(RECORDS / "cpu_defenses_fp32" / "defense-sft_seed-0",
                    records / "defense-sft_seed-0")
    # the search runs before the stages: a virus run's data stage holds none of it
    as_virus("searched", {"cached": False, "seconds": 900.0})
    rates = measure(records, "fp32")
    assert rates.fixed_seconds[("attack:virus", "search")] == 900.0
    plain = rates.fixed_seconds[("sft", "data")]
    cells = {c.name: c for c in cpu_cells(sweep, rates)}
    assert cells[virus.format(0)].seconds["data"] == pytest.approx(900.0 + plain)
    assert cells[virus.format(1)].seconds["data"] == pytest.approx(900.0 + plain)
    assert cells[screened.format(0)].seconds["data"] == pytest.approx(plain)
    assert "virus's search" not in cells[virus.format(0)].unmeasured
    # an older record's data stage (which may hold its search) times neither
    as_virus("older", None, data_seconds=1200.0)
    assert measure(records, "fp32").fixed_seconds[("sft", "data")] == pytest.approx(plain)
    as_virus("reused", {"cached": True, "seconds": 10.0})  # a reuse times no search
    assert measure(records, "fp32").fixed_seconds[("attack:virus", "search")] == 900.0


@pytest.mark.skipif(not (RECORDS / "cpu_defenses_fp32").is_dir(), reason="no records")
def test_a_defense_that_acts_in_fine_tuning_is_never_taken_to_reuse_sfts(tmp_path) -> None:
    import shutil

    import yaml

    records = tmp_path / "records"
    for run in ("defense-sft_seed-0", "defense-sft_seed-1"):
        shutil.copytree(RECORDS / "cpu_defenses_fp32" / run, records / run)
    # a guardrail that screened nothing out found its fine-tuning in the cache (sft's upload)
    screened = records / "screened"
    shutil.copytree(records / "defense-sft_seed-1", screened)
    config = yaml.safe_load((screened / "config.yaml").read_text())
    config.update(defense="guardrail", defense_args={"judge": "keyword"})
    (screened / "config.yaml").write_text(yaml.safe_dump(config))
    metrics = json.loads((screened / "metrics.json").read_text())
    metrics["stages"]["finetune"]["cached"] = True
    (screened / "metrics.json").write_text(json.dumps(metrics))
    rates = measure(records, "fp32")
    assert not rates.reuses_finetune
    cells = {c.name: c for c in cpu_cells(load_sweep(CPU_DEFENSES, check=False), rates)}
    guarded = next(c for name, c in cells.items() if name.startswith("defense-guardrail"))
    assert guarded.seconds["finetune"] == pytest.approx(cells["defense-sft_seed-1"].seconds[
        "finetune"])
