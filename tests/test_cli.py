from hftlab.cli import main


def test_list_shows_every_plugin_with_docs(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("sft", "harmful_mix", "keyword", "sst2", "gsm8k", "ag_news"):
        assert name in out
    assert "paper:" in out and "reference:" in out
    from hftlab.defenses import DEFENSES

    for name in DEFENSES.names():
        assert f"  {name} " in out
    assert "options: lamb=5.0, alpha=0.1" in out  # booster's reference defaults


def test_a_defense_missing_its_data_is_one_clear_error(tiny_overrides, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", "configs/quickstart.yaml", *tiny_overrides, "defense=booster",
                 "provider_harmful=null", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "provider_harmful" in err and "booster" in err


def test_report_on_an_unfinished_run_is_an_error(tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "has not finished" in capsys.readouterr().err


def test_run_and_report_end_to_end(tiny_overrides, tmp_path, capsys) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("seed: 1\n")
    out = tmp_path / "run"
    assert main(["run", str(config), *tiny_overrides, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "harmful score" in printed and "fine-tuned (sft)" in printed
    assert "[placeholder" not in printed  # completions stay in files
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text().startswith("# hftlab run report")


def test_list_shows_each_defense_settings_table(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "settings (reference / default / CPU preset; ≠ differs):" in out
    assert "defense_args.lamb: 5 / 5 / 5" in out  # booster
    assert "finetune.train.lr: 1e-5 / ≠" in out  # hftlab's lr is calibrated, not 1e-5
    assert "defense_args.alignment_step: 100 / 100 / ≠3" in out  # lisa's CPU cell


def test_docs_writes_the_file_and_check_finds_drift(tmp_path, capsys) -> None:
    out = tmp_path / "docs" / "defenses.md"
    assert main(["docs", "--check", "--out", str(out)]) == 1
    assert main(["docs", "--out", str(out)]) == 0
    assert out.read_text().startswith("# Defenses: reference settings")
    assert main(["docs", "--check", "--out", str(out)]) == 0
    out.write_text(out.read_text() + "edited by hand\n")
    capsys.readouterr()
    assert main(["docs", "--check", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of date" in err
