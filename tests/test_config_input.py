"""Settings as a new user gets them wrong: misspelt keys, bad ``--set`` values, odd config files and sample
sheets, a work folder prepared twice. Each is one line naming the setting or file, or a warning line."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from in_process import run_cli
from synthetic import write_st_section

from he2st.data.samplesheet import read_samplesheet
from he2st.errors import He2stError
from he2st.workflows.config import PrepareConfig, TrainRunConfig, load_config


def test_misspelt_key_names_the_close_match() -> None:
    with pytest.raises(He2stError, match=r"data\.sectons='A1': unknown setting; did you mean 'sections'\?"):
        load_config(PrepareConfig, None, ["data.sectons=A1"])
    with pytest.raises(He2stError, match=r"invalid option train\.epoch=4: unknown setting; did you mean 'epochs'\?"):
        load_config(TrainRunConfig, None, ["method_options.bleep.train.epoch=4"])


def test_set_value_that_is_not_yaml_is_one_line() -> None:
    with pytest.raises(He2stError, match=r"^--set data\.sections: value '\[A1, B1' is not valid YAML"):
        load_config(PrepareConfig, None, ["data.sections=[A1, B1"])
    with pytest.raises(He2stError, match="a key must be a dotted name"):
        load_config(PrepareConfig, None, ["data..sections=[A1]"])


def test_bad_set_value_is_not_blamed_on_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("folds: {scheme: lopo}\n")
    with pytest.raises(He2stError) as caught:
        load_config(PrepareConfig, config, ["patch.field_um=abc"])
    assert caught.value.path is None and "patch.field_um='abc'" in str(caught.value)
    config.write_text("patch: {field_um: abc}\n")
    with pytest.raises(He2stError) as caught:
        load_config(PrepareConfig, config)
    assert caught.value.path == str(config)


def test_config_file_with_a_key_twice_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("work_dir: a\nfolds: {scheme: lopo}\nwork_dir: b\n")
    with pytest.raises(He2stError, match=r"run\.yaml: invalid YAML: duplicate key 'work_dir' \(line 3\)"):
        load_config(PrepareConfig, config)
    config.write_text("patch:\n\tfield_um: 100\n")
    with pytest.raises(He2stError, match=r"invalid YAML: found character '\\t' .*\(line 2\)"):
        load_config(PrepareConfig, config)


def test_home_folder_in_paths_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = tmp_path / "run.yaml"
    config.write_text("work_dir: ~/work\ndata: {samplesheet: ~/sheet.csv}\n")
    cfg = load_config(PrepareConfig, config)
    assert cfg.work_dir == tmp_path / "work" and cfg.data.samplesheet == tmp_path / "sheet.csv"
    monkeypatch.setenv("HE2ST_WORK_DIR", "")
    assert load_config(PrepareConfig).work_dir == Path("he2st-work")  # empty is unset, not the current folder
    monkeypatch.setenv("HE2ST_WORK_DIR", "~/w")
    assert load_config(PrepareConfig).work_dir == tmp_path / "w"


def test_sheet_rows_empty_or_repeated(tmp_path: Path) -> None:
    sheet = tmp_path / "s.csv"
    sheet.write_text("sample,patient,reader,path\nA,P1,st,a.tsv\n\n,,,\nB,P2,st,b.tsv\n")
    assert [s["sample_id"] for s in read_samplesheet(sheet)] == ["A", "B"]  # blank and all-empty rows skipped
    sheet.write_text("sample,patient,reader,path\nA,P1,st,a.tsv\n\nA,P2,st,b.tsv\n")
    with pytest.raises(He2stError, match=r"line 4: sample 'A' is listed again \(first on line 2\)") as caught:
        read_samplesheet(sheet)
    assert caught.value.path == str(sheet)
    sheet.write_text("sample,patient,reader,path\nA,P1,st,a.tsv\n\n,P2,st,b.tsv\n")
    with pytest.raises(He2stError, match=r"line 4: empty 'sample'"):  # line numbers count blank lines
        read_samplesheet(sheet)


def test_prepare_again_names_what_the_earlier_prepare_left(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    secs = {n: write_st_section(raw / n, seed=i) for i, n in enumerate("AB")}

    def sheet(names: str) -> Path:
        path = raw / f"{names}.csv"
        pd.DataFrame({"sample": list(names), "patient": [f"P{n}" for n in names], "reader": "st",
                      "path": [str(secs[n]["counts"]) for n in names], "image": [str(secs[n]["image"]) for n in names],
                      "spots_file": [str(secs[n]["spots"]) for n in names]}).to_csv(path, index=False)
        return path

    work = tmp_path / "work"
    first = run_cli("prepare", "--samplesheet", sheet("AB"), "-w", work, "--set", "context_field=false")
    assert first.returncode == 0 and "earlier prepare" not in first.stderr, first.stderr
    again = run_cli("prepare", "--samplesheet", sheet("A"), "-w", work, "--set", "context_field=false")
    assert again.returncode == 0, again.stderr
    line = next(x for x in again.stderr.splitlines() if "earlier prepare" in x)
    assert "sample(s) B" in line and "lopo.json" in line


def test_every_option_has_a_description() -> None:
    res = run_cli("embed", "--help")
    assert res.returncode == 0 and "patches per encoder batch" in res.stdout
