"""``preftune loss``: the README example digit for digit, values by hand, and bad input.

Expected numbers are computed here with ``math`` (the arithmetic is in each docstring), or
taken from the README's hand-worked example, never from the code under test.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
from pathlib import Path

import pytest

from preftune.calculator import format_number, main, register
from preftune.losses import LOSSES

README = Path(__file__).resolve().parents[1] / "README.md"
FLAGS = [
    "--policy-chosen-logps", "-12.5",
    "--policy-rejected-logps", "-15",
    "--reference-chosen-logps", "-13",
    "--reference-rejected-logps", "-14",
]  # fmt: skip


def neg_log_sigmoid(z: float) -> float:
    return math.log1p(math.exp(-z)) if z >= 0 else -z + math.log1p(math.exp(z))


def sigma(z: float) -> float:
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys, argv: list[str]) -> list[dict]:
    code, out, err = run_cli(capsys, [*argv, "--json"])
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def printed_rows(out: str) -> dict[str, list[str]]:
    """Table rows of the text output: label -> one cell per beta (last pair wins)."""
    rows = {}
    for line in out.splitlines():
        if line.startswith("  "):
            label, *cells = re.split(r"\s{2,}", line.strip())
            rows[label] = cells
    return rows


# ---------------------------------------------------------------------------------------------
# The README example


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("<!-- loss-example:start -->")
    end = text.index("<!-- loss-example:end -->")
    return text[start:end]


def markdown_table(block: str, first_header: str) -> dict[str, list[str]]:
    """The table whose header starts with ``first_header``: first cell -> the other cells."""
    lines = block.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def console_example(block: str) -> tuple[list[str], str]:
    """(argv after ``preftune loss``, the printed output) from the README's console block."""
    body = block.split("```console\n", 1)[1].split("```", 1)[0]
    command, output = body.split("\n", 1)
    while command.endswith("\\"):
        more, output = output.split("\n", 1)
        command = command[:-1] + more
    words = shlex.split(command.removeprefix("$ "))
    assert words[:2] == ["preftune", "loss"]
    return words[2:], output


def test_readme_output_is_exactly_what_preftune_loss_prints(capsys):
    argv, expected = console_example(readme_example())
    code, out, err = run_cli(capsys, argv)
    assert (code, err) == (0, "")
    assert out == expected


def test_readme_hand_worked_steps_match_the_printed_table(capsys):
    argv, _ = console_example(readme_example())
    steps = markdown_table(readme_example(), "step")
    _, out, _ = run_cli(capsys, argv)
    printed = printed_rows(out)
    assert len(steps) == 11
    for label, (_, value) in steps.items():
        assert printed[label] == [value], label


def test_readme_inputs_are_the_ones_the_command_uses():
    argv, _ = console_example(readme_example())
    inputs = markdown_table(readme_example(), "input")
    flags = dict(zip(argv[::2], argv[1::2], strict=True))
    assert flags == {
        "--policy-chosen-logps": inputs["policy, chosen"][1],
        "--policy-rejected-logps": inputs["policy, rejected"][1],
        "--reference-chosen-logps": inputs["reference, chosen"][1],
        "--reference-rejected-logps": inputs["reference, rejected"][1],
        "--beta": inputs["beta"][1],
    }


def test_readme_hand_arithmetic_is_right():
    """Recompute every README step from its inputs with math, formatted to 6 decimals."""
    inputs = {k: float(v[1]) for k, v in markdown_table(readme_example(), "input").items()}
    beta = inputs["beta"]
    chosen = inputs["policy, chosen"] - inputs["reference, chosen"]
    rejected = inputs["policy, rejected"] - inputs["reference, rejected"]
    h = chosen - rejected
    expected = {
        "chosen log-ratio": chosen,
        "rejected log-ratio": rejected,
        "h": h,
        "beta * h": beta * h,
        "sigma(beta h)": 1 / (1 + math.exp(-beta * h)),
        "loss": math.log(1 + math.exp(-beta * h)),
        "chosen reward": beta * chosen,
        "rejected reward": beta * rejected,
        "reward margin": beta * chosen - beta * rejected,
        "grad weight": 1 / (1 + math.exp(beta * h)),
    }
    steps = markdown_table(readme_example(), "step")
    for label, value in expected.items():
        assert steps[label][1] == f"{value:.6f}", label
    assert steps["region"][1] == "flat (model agrees)"


# ---------------------------------------------------------------------------------------------
# Values


def test_several_betas_print_side_by_side_by_hand(capsys):
    """h = 1.5. beta 0.05, 0.1, 0.5: beta h = 0.075, 0.15, 0.75;
    loss ln(1 + e^-beta h) = 0.656350, 0.620957, 0.386871;
    grad weight sigma(-beta h) = 0.481259, 0.462570, 0.320821.
    """
    code, out, _ = run_cli(capsys, [*FLAGS, "--beta", "0.05,0.1,0.5"])
    assert code == 0
    rows = printed_rows(out)
    assert rows["step"] == ["beta=0.05", "beta=0.1", "beta=0.5"]
    assert rows["beta * h"] == ["0.075000", "0.150000", "0.750000"]
    assert rows["loss"] == [f"{math.log1p(math.exp(-0.05 * 1.5 * k)):.6f}" for k in (1, 2, 10)]
    assert rows["loss"] == ["0.656350", "0.620957", "0.386871"]
    assert rows["grad weight"] == ["0.481259", "0.462570", "0.320821"]


def test_json_has_one_object_per_pair_and_beta_with_values_by_hand(capsys):
    """Pair 2: log-ratios -20 + 19 = -1 and -18 + 19 = 1, h = -2.

    beta 0.5: beta h = -1, loss ln(1 + e^1) = 1.313262, grad weight sigma(1) = 0.731059,
    rewards -0.5 and 0.5: the model disagrees (steep).
    """
    argv = [
        "--policy-chosen-logps", "-12.5,-20", "--policy-rejected-logps", "-15,-18",
        "--reference-chosen-logps", "-13,-19", "--reference-rejected-logps", "-14,-19",
        "--beta", "0.1,0.5",
    ]  # fmt: skip
    records = run_json(capsys, argv)
    assert [(r["pair"], r["beta"]) for r in records] == [(1, 0.1), (1, 0.5), (2, 0.1), (2, 0.5)]
    required = {
        "beta", "loss_type", "chosen_logratio", "rejected_logratio", "h", "loss",
        "chosen_reward", "rejected_reward", "grad_weight",
    }  # fmt: skip
    assert all(required <= set(r) for r in records)
    last = records[-1]
    assert last["loss_type"] == "sigmoid"
    assert (last["chosen_logratio"], last["rejected_logratio"], last["h"]) == (-1.0, 1.0, -2.0)
    assert last["loss"] == pytest.approx(math.log1p(math.e), rel=1e-12)
    assert last["grad_weight"] == pytest.approx(sigma(1.0), rel=1e-12)
    assert (last["chosen_reward"], last["rejected_reward"]) == (-0.5, 0.5)
    assert last["region"] == "steep"
    assert records[0]["region"] == "flat"


def test_policy_equal_to_reference_sits_at_the_bend_with_loss_ln2(capsys):
    """h = 0: loss ln 2 = 0.693147, sigma(0) = 0.5, grad weight 0.5."""
    argv = [
        "--policy-chosen-logps", "-7", "--policy-rejected-logps", "-9",
        "--reference-chosen-logps", "-7", "--reference-rejected-logps", "-9",
    ]  # fmt: skip
    (record,) = run_json(capsys, argv)
    assert record["loss"] == pytest.approx(math.log(2), rel=1e-12)
    assert record["grad_weight"] == 0.5
    assert record["region"] == "bend"


def test_extreme_inputs_stay_finite_and_tiny_values_print_in_scientific_notation(capsys):
    """Log-probs near -1000, beta h = +50: loss ln(1 + e^-50) = 1.928750e-22, weight the same."""
    argv = [
        "--policy-chosen-logps", "-950", "--policy-rejected-logps", "-1000",
        "--reference-chosen-logps", "-1000", "--reference-rejected-logps", "-1000",
        "--beta", "1",
    ]  # fmt: skip
    code, out, _ = run_cli(capsys, argv)
    assert code == 0
    assert printed_rows(out)["loss"] == ["1.928750e-22"]
    assert printed_rows(out)["grad weight"] == ["1.928750e-22"]
    assert printed_rows(out)["beta * h"] == ["50.000000"]


def test_rpo_alpha_prints_the_preference_and_nll_parts(capsys):
    """nll = 12.5 / 5 = 2.5; loss = 0.620957 + 0.5 * 2.5 = 1.870957; weight excludes the NLL."""
    argv = [*FLAGS, "--chosen-length", "5", "--rejected-length", "4", "--rpo-alpha", "0.5"]
    code, out, _ = run_cli(capsys, argv)
    rows = printed_rows(out)
    assert code == 0
    assert (rows["loss"], rows["preference loss"], rows["nll"]) == (
        ["1.870957"],
        ["0.620957"],
        ["2.500000"],
    )
    assert rows["grad weight"] == ["0.462570"]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_registered_loss_works_and_its_grad_weight_matches_finite_differences(name, capsys):
    """grad weight = -(1 / beta) dL / d log pi(y_w), checked by central differences (step 1e-5)."""
    hyper = ["--beta", "2", "--simpo-gamma", "1"] if name == "simpo" else ["--beta", "0.5"]
    extra = ["--loss", name, *hyper, "--chosen-length", "5", "--rejected-length", "4"]
    (record,) = run_json(capsys, [*FLAGS, *extra])
    assert record["loss_type"] == name
    assert math.isfinite(record["loss"])

    def loss_at(policy_chosen: float) -> float:
        argv = [*FLAGS[:1], str(policy_chosen), *FLAGS[2:], *extra]
        return run_json(capsys, argv)[0]["loss"]

    step = 1e-5
    slope = (loss_at(-12.5 + step) - loss_at(-12.5 - step)) / (2 * step)
    beta = 2.0 if name == "simpo" else 0.5
    assert record["grad_weight"] == pytest.approx(-slope / beta, rel=1e-5, abs=1e-9)


def test_reference_free_loss_needs_no_reference_and_prints_dashes(capsys):
    """ref_free, beta 0.1: loss ln(1 + e^-0.1 * 2.5) = 0.575939; no log-ratios to show."""
    argv = ["--policy-chosen-logps", "-12.5", "--policy-rejected-logps", "-15"]
    code, out, _ = run_cli(capsys, [*argv, "--loss", "ref_free"])
    rows = printed_rows(out)
    assert code == 0
    assert rows["h"] == ["-"] and rows["chosen log-ratio"] == ["-"]
    assert rows["loss"] == ["0.575939"]
    (record,) = run_json(capsys, [*argv, "--loss", "ref_free"])
    assert record["h"] is None


def test_csv_and_jsonl_files_give_the_same_numbers_as_flags(tmp_path, capsys):
    header = "policy_chosen_logps,policy_rejected_logps,reference_chosen_logps,"
    header += "reference_rejected_logps,chosen_length,rejected_length"
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text(f"{header}\n-12.5,-15,-13,-14,5,4\n-20,-18,-19,-19,6,3\n")
    jsonl_file = tmp_path / "pairs.jsonl"
    rows = [(-12.5, -15, -13, -14, 5, 4), (-20, -18, -19, -19, 6, 3)]
    jsonl_file.write_text(
        "".join(json.dumps(dict(zip(header.split(","), row, strict=True))) + "\n\n" for row in rows)
    )
    flags = [
        "--policy-chosen-logps", "-12.5,-20", "--policy-rejected-logps", "-15,-18",
        "--reference-chosen-logps", "-13,-19", "--reference-rejected-logps", "-14,-19",
        "--chosen-length", "5,6", "--rejected-length", "4,3",
    ]  # fmt: skip
    for loss in ("ipo", "simpo"):
        hyper = ["--loss", loss, "--beta", "2" if loss == "simpo" else "0.1"]
        from_flags = run_json(capsys, [*flags, *hyper])
        assert run_json(capsys, ["--input", str(csv_file), *hyper]) == from_flags
        assert run_json(capsys, ["--input", str(jsonl_file), *hyper]) == from_flags
    # ipo, pair 2: h_mean = -1 / 6 - 1 / 3 = -0.5, loss (-0.5 - 5)^2 = 30.25.
    assert run_json(capsys, [*flags, "--loss", "ipo"])[1]["loss"] == pytest.approx(30.25)


def test_comma_lists_of_negative_numbers_parse_under_a_parent_parser(capsys):
    """The way the preftune command mounts the subcommand: a parser with subparsers."""
    parser = argparse.ArgumentParser(prog="preftune")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "loss", "--policy-chosen-logps", "-12.5,-1e3", "--policy-rejected-logps", "-15,-950",
        "--reference-chosen-logps", "-13,-1000", "--reference-rejected-logps", "-14,-1000",
        "--json",
    ])  # fmt: skip
    assert args.func(args) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["h"] for r in records] == [1.5, -50.0]


def test_format_number_keeps_six_decimals_and_small_values_visible():
    assert format_number(0.5374298453437496, 6) == "0.537430"
    assert format_number(-0.0, 6) == "0.000000"
    assert format_number(1.9287498479639178e-22, 6) == "1.928750e-22"
    assert format_number(-50.0, 3) == "-50.000"


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, no traceback


def _file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


FULL_HEADER = (
    "policy_chosen_logps,policy_rejected_logps,reference_chosen_logps,reference_rejected_logps"
)


@pytest.mark.parametrize(
    ("make_argv", "message"),
    [
        (lambda d: ["--input", str(d / "missing.csv")], r"missing\.csv: No such file or directory"),
        (
            lambda d: [
                "--input",
                _file(d, "p.csv", "policy_chosen_logps,policy_rejected_logps\n-1,-2\n"),
            ],
            (
                r"p\.csv: missing column reference_chosen_logps and column "
                r"reference_rejected_logps \(needed by --loss sigmoid\)"
            ),
        ),
        (
            lambda d: ["--input", _file(d, "p.csv", f"{FULL_HEADER}\n-1,-2,-3,-4\n-1,abc,-3,-4\n")],
            r"p\.csv, row 2 \(line 3\), policy_rejected_logps: 'abc' is not a number",
        ),
        (
            lambda d: ["--input", _file(d, "p.csv", f"{FULL_HEADER}\n-1,-2,,-4\n")],
            r"p\.csv, row 1 \(line 2\): reference_chosen_logps is missing or empty",
        ),
        (
            lambda d: ["--input", _file(d, "p.csv", f"{FULL_HEADER}\n-1,-2,-3,0.5\n")],
            r"p\.csv, row 1 \(line 2\), reference_rejected_logps: 0\.5 is positive",
        ),
        (
            lambda d: ["--input", _file(d, "p.jsonl", '{"policy_chosen_logps": -1,\n')],
            r"p\.jsonl, line 1: not valid JSON",
        ),
        (
            lambda d: ["--input", _file(d, "p.jsonl", "[1, 2]\n")],
            r"p\.jsonl, line 1: expected a JSON object, got list",
        ),
        (lambda d: ["--input", _file(d, "p.csv", f"{FULL_HEADER}\n")], r"p\.csv: no pairs found"),
        (lambda d: ["--input", _file(d, "p.txt", "x")], r"p\.txt: unknown file type '\.txt'"),
        (
            lambda d: [
                "--input",
                _file(d, "p.csv", "policy_chosen_logps,policy_rejected_logps\n-1,-2\n"),
                "--loss",
                "simpo",
                "--beta",
                "2",
            ],
            r"missing column chosen_length and column rejected_length \(needed by --loss simpo\)",
        ),
        (lambda d: [*FLAGS, "--beta", "0"], r"--beta must be > 0 \(got 0\.0\)"),
        (lambda d: [*FLAGS, "--beta", "0.1,abc"], r"--beta, item 2: 'abc' is not a number"),
        (
            lambda d: [*FLAGS, "--loss", "robust", "--label-smoothing", "0.5"],
            r"--label-smoothing must be in \[0, 0\.5\)",
        ),
        (lambda d: [*FLAGS, "--loss", "dpo"], r"--loss: unknown loss 'dpo'; known losses: hinge"),
        (lambda d: [*FLAGS, "--rpo-alpha", "-1"], r"--rpo-alpha must be >= 0"),
        (
            lambda d: [*FLAGS, "--rpo-alpha", "1"],
            r"missing --chosen-length and --rejected-length \(needed by --rpo-alpha > 0\)",
        ),
        (lambda d: FLAGS[:4], r"missing --reference-chosen-logps and --reference-rejected-logps"),
        (
            lambda d: [*FLAGS[:3], "-15,-16", *FLAGS[4:]],
            r"--policy-rejected-logps has 2 value\(s\) but --policy-chosen-logps has 1",
        ),
        (
            lambda d: ["--policy-chosen-logps", "nan", *FLAGS[2:]],
            r"--policy-chosen-logps: 'nan' is not a finite number",
        ),
        (lambda d: ["--input", "x.csv", *FLAGS], r"use either --input or --policy-chosen-logps"),
        (lambda d: [], r"give the pairs' log-probs as flags"),
        (lambda d: [*FLAGS, "--digits", "x"], r"--digits: 'x' is not a number"),
    ],
)
def test_bad_input_is_one_line_naming_the_problem_with_exit_code_2(
    make_argv, message, tmp_path, capsys
):
    code, out, err = run_cli(capsys, make_argv(tmp_path))
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("preftune loss: error: ")
    assert re.search(message, err), err
