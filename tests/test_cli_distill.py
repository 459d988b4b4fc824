"""`lcsm-distill` (lcsm_jax/cli/distill.py) and what `lcsm-generate` does with a distilled
directory (modal by default, exact on request, --compare_exact, past l_max).

Two tiny byte-level models, saved into temporary directories: `random` (random filters, poorly
fitted at order 4, so modal and exact differ) and `low_order` (the filter MLP's last layer
constant, so every filter is c * (decay^t + shift): two real poles, fitted to ~1e-6 at order
4, so modal agrees with exact)."""

import json
import math
import pathlib
import re
import tomllib
import warnings

import jax
import numpy as np
import pytest

import lcsm_jax
from lcsm_jax import io
from lcsm_jax import text
from lcsm_jax.cli import distill as distill_cli
from lcsm_jax.cli import generate as generate_cli
from lcsm_jax.distillation import DistillationWarning
from lcsm_jax.models.hyena import HyenaConfig, init_params

ROOT = pathlib.Path(__file__).parent.parent
CONFIG = HyenaConfig(vocab_size=256, d_model=8, n_layer=2, d_inner=16, l_max=64, order=2,
                     filter_order=8, emb_dim=3)
AGREEMENT = re.compile(r"^compare_exact: equal_tokens=(\d+)/(\d+) first_difference=(\d+|none) "
                       r"mean_kl=(\S+) max_kl=(\S+) ", re.M)


def _distill(capsys, *argv):
  code = distill_cli.main(list(argv))
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def _generate(capsys, *argv):
  code = generate_cli.main(list(argv))
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def _api_distill(params, config, **kwargs):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DistillationWarning)
    return lcsm_jax.distill(params, config, **kwargs)


def _low_order_params():
  params = init_params(CONFIG, jax.random.key(0))
  last = params["params"]["stack"]["blocks"]["mixer"]["filter"]["dense_2"]
  last["kernel"] = last["kernel"] * 0
  last["bias"] = last["bias"] + 0.1
  return params


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """{'random': dir, 'low_order': dir} (plain checkpoints) and their params."""
  root = tmp_path_factory.mktemp("checkpoints")
  params = {"random": init_params(CONFIG, jax.random.key(1)), "low_order": _low_order_params()}
  for name, p in params.items():
    lcsm_jax.save_params(root / name, CONFIG, p)
  return {name: root / name for name in params}, params


@pytest.fixture(scope="module")
def distilled_dirs(checkpoints, tmp_path_factory):
  """The two models distilled at order 4 by the command, into new directories."""
  dirs, _ = checkpoints
  root = tmp_path_factory.mktemp("distilled")
  out = {}
  for name, path in dirs.items():
    out[name] = root / name
    assert distill_cli.main(["--checkpoint", str(path), "--order", "4", "--out",
                             str(out[name])]) == 0
  return out


def _same_distilled(a, b):
  for x, y in ((a.filters.poles, b.filters.poles), (a.filters.residues, b.filters.residues),
               (a.filters.h0, b.filters.h0), (a.skip, b.skip)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# -- lcsm-distill. ---------------------------------------------------------------------------------

def test_distill_saves_what_the_api_computes_and_prints_the_table(capsys, tmp_path,
                                                                   checkpoints):
  dirs, params = checkpoints
  out = tmp_path / "new" / "distilled"  # parents created
  code, stdout, err = _distill(capsys, "--checkpoint", str(dirs["random"]), "--order", "4",
                               "--out", str(out))
  assert code == 0, err
  expected = _api_distill(params["random"], CONFIG, order=4)
  assert io.has_distilled(out)
  loaded = io.load_distilled(out)
  _same_distilled(loaded, expected)
  config, saved = io.load_params(out)
  assert config == CONFIG
  jax.tree.map(np.testing.assert_array_equal, saved, jax.tree.map(np.asarray, params["random"]))
  # The table: Distilled.table() of the same figures, then the timings.
  assert stdout.startswith(expected.table().splitlines()[0] + "\n")
  assert "distilled 2 streams x 8 channels, 64 taps, order 4, stored N = 4" in stdout
  table_rows = [line.split() for line in stdout.splitlines()[3:6]]
  assert [row[0] for row in table_rows] == ["0", "1", "all"]
  p50, p90, worst = (float(x) for x in table_rows[2][1:6:2])
  overall = expected.report["overall"]["rel_l2"]
  assert (p50, p90, worst) == pytest.approx((overall["p50"], overall["p90"], overall["max"]),
                                            rel=5e-3)
  assert re.search(r"^time: \d+\.\d s \(filters .* fit .* refine .* report .*\)$", stdout, re.M)
  # Progress, the warning as one line, the saved directory: all on stderr.
  assert "lcsm-distill: streams 0..0 (64 taps)" in err
  assert "lcsm-distill: streams 1..1 (64 taps)" in err
  assert re.search(r"^lcsm-distill: warning: \d+ of 16 filters have relative l2 tap error above "
                   r"warn_error=0\.1 at order 4", err, re.M)
  assert "Traceback" not in err and "DistillationWarning" not in err and "warnings.warn" not in err
  assert f"saved the model with its distilled filters (stored N = 4) to {out}" in err
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "distilled.safetensors",
                                                   "params.safetensors"]
  assert not list(out.parent.glob(".*"))  # no temporary directory left


def test_distill_by_tolerance_and_from_a_hyenadna_checkpoint(capsys, tmp_path, fixture_dir):
  """--tol, --length and --refine_steps reach lcsm_jax.distill; a HyenaDNA checkpoint is saved
  in the project's format with its distilled section."""
  out = tmp_path / "dna"
  code, stdout, err = _distill(capsys, "--checkpoint", str(fixture_dir), "--tol", "0.05",
                               "--max_order", "6", "--length", "40", "--refine_steps", "2",
                               "--out", str(out))
  assert code == 0, err
  config, params = lcsm_jax.load_hyenadna(fixture_dir)
  expected = _api_distill(params, config, tol=0.05, max_order=6, length=40, refine_steps=2)
  _same_distilled(io.load_distilled(out), expected)
  assert "40 taps, tol 0.05" in stdout
  loaded_config, _, _ = io.load_checkpoint(str(out))
  assert loaded_config == config


@pytest.mark.parametrize("argv, message", [
    (["--order", "4", "--tol", "0.1"], "argument --tol: not allowed with argument --order"),
    ([], "one of the arguments --order --tol is required"),
    (["--order", "3"], "argument --order: must be even (N real states are N/2 complex-conjugate "
     "pole pairs), got 3"),
    (["--order", "0"], "argument --order: must be >= 2, got 0"),
    (["--order", "four"], "argument --order: expected an integer, got 'four'"),
    (["--tol", "0"], "argument --tol: must lie in (0, 1), got 0"),
    (["--tol=-1e-3"], "argument --tol: must lie in (0, 1), got -1e-3"),
    (["--tol", "-0.5"], "argument --tol: must lie in (0, 1), got -0.5"),
    (["--tol", "1"], "argument --tol: must lie in (0, 1), got 1"),
    (["--tol", "nan"], "argument --tol: expected a finite number, got 'nan'"),
    (["--order", "4", "--max_order", "5"], "argument --max_order: must be even"),
    (["--order", "4", "--refine_steps", "-1"], "argument --refine_steps: must be >= 0"),
    (["--order", "4", "--checkpoint", "/no/such/checkpoint"],
     "lcsm-distill: error: no checkpoint at '/no/such/checkpoint'"),
    (["--order", "40", "--checkpoint", "RANDOM"],
     "lcsm-distill: error: order 40 is above what the taps support: 64 taps give a 31 x 31 "
     "Hankel window"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, checkpoints, argv, message):
  dirs, _ = checkpoints
  argv = [str(dirs["random"]) if a == "RANDOM" else a for a in argv]
  code, stdout, err = _distill(capsys, *argv, "--out", str(tmp_path / "out"))
  assert code == 2
  assert message in err
  assert err.rstrip().splitlines()[-1].startswith("lcsm-distill: error: ")
  assert "Traceback" not in err and stdout == ""
  assert not (tmp_path / "out").exists()


def test_out_is_required(capsys):
  code, _, err = _distill(capsys, "--order", "4")
  assert code == 2
  assert err.rstrip().splitlines()[-1] == ("lcsm-distill: error: the following arguments are "
                                           "required: --out")


def test_an_existing_out_is_refused_unless_overwrite(capsys, tmp_path, checkpoints):
  dirs, params = checkpoints
  plain = ["--checkpoint", str(dirs["random"]), "--out"]
  a_file = tmp_path / "file"
  a_file.write_text("x")
  code, stdout, err = _distill(capsys, *plain, str(a_file), "--order", "4")
  assert code == 2 and stdout == ""
  assert err.rstrip() == f"lcsm-distill: error: --out {a_file} is a file, not a directory."
  # An existing checkpoint: refused before distilling (no table), untouched.
  out = tmp_path / "ckpt"
  lcsm_jax.save_params(out, CONFIG, params["random"])
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  code, stdout, err = _distill(capsys, *plain, str(out), "--order", "4")
  assert code == 2 and stdout == ""
  assert err.rstrip() == (f"lcsm-distill: error: --out {out} already exists and is not empty "
                          "(config.json, params.safetensors); pass --overwrite to replace the "
                          "checkpoint in it, or choose another directory.")
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before
  # --overwrite: distilled in place (order 2), then replaced again (order 4).
  for order in ("2", "4"):
    code, _, err = _distill(capsys, *plain, str(out), "--order", order, "--overwrite")
    assert code == 0, err
    assert io.load_distilled(out).order == int(order)
  # A HyenaDNA checkpoint is never replaced (its weights would stay beside a new config.json).
  dna = tmp_path / "dna"
  dna.mkdir()
  (dna / "model.safetensors").write_bytes(b"weights")
  code, _, err = _distill(capsys, *plain, str(dna), "--order", "4", "--overwrite")
  assert code == 2
  assert err.rstrip() == (f"lcsm-distill: error: --out {dna} holds a checkpoint of another "
                          "format (model.safetensors); lcsm-distill replaces only directories "
                          "of its own format. Choose another directory.")
  # An empty directory is a new one.
  empty = tmp_path / "empty"
  empty.mkdir()
  code, _, err = _distill(capsys, *plain, str(empty), "--order", "4")
  assert code == 0, err
  assert io.has_distilled(empty)


def test_help_and_console_script(capsys):
  code, out, _ = _distill(capsys, "--help")
  assert code == 0
  for flag in ("--checkpoint", "--order", "--tol", "--out", "--overwrite", "--refine_steps",
               "--max_order", "--length"):
    assert flag in out
  project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
  assert project["scripts"]["lcsm-distill"] == "lcsm_jax.cli.distill:main"


# -- lcsm-generate on a distilled directory. -------------------------------------------------------

def _modal_tokens(directory, params, prompt, num_tokens, seed, **sampling):
  return np.asarray(lcsm_jax.generate(
      params, CONFIG, text.encode(prompt)[None], num_tokens, jax.random.key(seed),
      strategy="modal", distilled=io.load_distilled(directory), **sampling).tokens[0])


def test_a_distilled_directory_runs_modal_by_default(capsys, checkpoints, distilled_dirs):
  _, params = checkpoints
  directory = distilled_dirs["random"]
  code, out, err = _generate(capsys, "--checkpoint", str(directory), "--prompt", "def ",
                             "--num_tokens", "20", "--seed", "3", "--temperature", "1",
                             "--top_k", "50", "--chunk_tokens", "7")
  assert code == 0, err
  modal = _modal_tokens(directory, params["random"], "def ", 20, 3, temperature=1.0, top_k=50)
  assert out == "def " + text.decode(modal) + "\n"
  median = io.load_distilled(directory).report["overall"]["rel_l2"]["p50"]
  assert (f"lcsm-generate: strategy modal on the distilled filters of {directory} (order 4, "
          f"median relative l2 tap error {median:.3g}): approximate") in err
  assert "strategy modal, seed 3" in err and "modal: 20 tokens in" in err
  # The model's filters are poorly fitted: the exact text differs (so the test can tell).
  exact = np.asarray(lcsm_jax.generate(params["random"], CONFIG, text.encode("def ")[None], 20,
                                       jax.random.key(3), top_k=50).tokens[0])
  assert not np.array_equal(modal, exact)


def test_an_exact_strategy_on_a_distilled_directory_runs_the_original_filters(
    capsys, checkpoints, distilled_dirs):
  _, params = checkpoints
  directory = distilled_dirs["random"]
  code, out, err = _generate(capsys, "--checkpoint", str(directory), "--prompt", "def ",
                             "--num_tokens", "20", "--seed", "3", "--temperature", "1",
                             "--top_k", "50", "--strategy", "flash", "--chunk_tokens", "0")
  assert code == 0, err
  exact = np.asarray(lcsm_jax.generate(params["random"], CONFIG, text.encode("def ")[None], 20,
                                       jax.random.key(3), top_k=50).tokens[0])
  assert out == "def " + text.decode(exact) + "\n"
  assert (f"lcsm-generate: {directory} holds distilled filters; strategy flash runs exactly on "
          "the original filters") in err
  assert "flash: 20 tokens in" in err and "modal" not in err


def test_modal_generates_past_l_max(capsys, checkpoints, distilled_dirs):
  """l_max 64: a 4-token prompt and 100 tokens need 103 positions; modal runs them, exactly as
  the Python API; an exact strategy refuses."""
  _, params = checkpoints
  directory = distilled_dirs["random"]
  argv = ["--checkpoint", str(directory), "--prompt", "def ", "--num_tokens", "100", "--seed",
          "5", "--chunk_tokens", "40", "--top_k", "40"]
  code, out, err = _generate(capsys, *argv)
  assert code == 0, err
  modal = _modal_tokens(directory, params["random"], "def ", 100, 5, temperature=0.8, top_k=40)
  assert out == "def " + text.decode(modal) + "\n"
  assert "modal: 100 tokens in" in err and "(3 calls;" in err
  code, out, err = _generate(capsys, *argv, "--strategy", "flash")
  assert code == 2 and out == ""
  assert "error: the prompt (4 tokens) and 100 new tokens need 103 positions, more than the " \
         "model's maximum length l_max = 64" in err
  code, out, err = _generate(capsys, *argv[:3], "a" * 65)
  assert code == 2 and out == ""
  assert "error: the prompt has 65 tokens, more than the model's maximum length l_max = 64" in err


def test_check_lengths_allows_past_l_max_for_modal_only():
  prompt = np.arange(10, dtype=np.int32)
  generate_cli.check_lengths(CONFIG, prompt, 1000, 0, "modal")
  for strategy in lcsm_jax.decoding.EXACT_STRATEGIES:
    with pytest.raises(ValueError, match="1009 positions, more than the model's maximum length"):
      generate_cli.check_lengths(CONFIG, prompt, 1000, 0, strategy)
  with pytest.raises(ValueError, match="the prompt has 65 tokens"):
    generate_cli.check_lengths(CONFIG, np.arange(65), 1, 0, "modal")


def _agreement(err):
  found = AGREEMENT.findall(err)
  assert len(found) == 1, err
  equal, total, first, mean_kl, max_kl = found[0]
  return int(equal), int(total), None if first == "none" else int(first), float(mean_kl), \
      float(max_kl)


def _independent_kl(params, directory, prompt, tokens):
  """KL(exact || modal) per step, from teacher-forced logits and jax.nn.log_softmax."""
  ids = np.concatenate([text.encode(prompt), tokens[:-1]])[None]
  p = len(text.encode(prompt))
  logits = [np.asarray(lcsm_jax.teacher_forced_logits(
      params, CONFIG, ids, prompt_length=p, strategy=strategy,
      distilled=io.load_distilled(directory) if strategy == "modal" else None))[0, p - 1:, :256]
      for strategy in ("flash", "modal")]
  log_p, log_q = (np.asarray(jax.nn.log_softmax(x.astype(np.float64)), np.float64)
                  for x in logits)
  return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


def test_compare_exact_reports_first_difference_and_kl(capsys, checkpoints, distilled_dirs):
  _, params = checkpoints
  directory = distilled_dirs["random"]
  code, out, err = _generate(capsys, "--checkpoint", str(directory), "--prompt", "def ",
                             "--num_tokens", "30", "--seed", "2", "--temperature", "1",
                             "--top_k", "50", "--compare_exact")
  assert code == 0, err  # differences are expected of an approximate strategy
  equal, total, first, mean_kl, max_kl = _agreement(err)
  modal = _modal_tokens(directory, params["random"], "def ", 30, 2, temperature=1.0, top_k=50)
  exact = np.asarray(lcsm_jax.generate(params["random"], CONFIG, text.encode("def ")[None], 30,
                                       jax.random.key(2), top_k=50).tokens[0])
  assert out == "def " + text.decode(modal) + "\n"  # the modal text, only once
  differ = np.flatnonzero(modal != exact)
  assert differ.size and first == differ[0] == equal and total == 30
  kl = _independent_kl(params["random"], directory, "def ", modal)
  assert kl.shape == (30,)
  assert mean_kl == pytest.approx(kl.mean(), rel=1e-4)
  assert max_kl == pytest.approx(kl.max(), rel=1e-4)
  assert mean_kl > 1e-4  # poorly fitted filters: the distributions do differ
  assert "flash: 30 tokens in" in err and "modal speed-up over flash" in err


def test_compare_exact_on_exactly_distilled_filters_agrees(capsys, distilled_dirs):
  """The low-order model's filters are two real poles each: order 4 fits them to ~1e-6, the
  sampled text is the exact text and the KL is ~0."""
  directory = distilled_dirs["low_order"]
  assert io.load_distilled(directory).report["overall"]["rel_l2"]["max"] < 1e-4
  code, _, err = _generate(capsys, "--checkpoint", str(directory), "--prompt", "def ",
                           "--num_tokens", "24", "--seed", "4", "--temperature", "1",
                           "--top_k", "256", "--compare_exact")
  assert code == 0, err
  equal, total, first, mean_kl, max_kl = _agreement(err)
  assert (equal, total, first) == (24, 24, None)
  assert "first_difference=none" in err
  assert 0 <= mean_kl <= max_kl < 1e-8


@pytest.mark.parametrize("argv, message", [
    (["--compare_exact", "--strategy", "flash"], "error: --compare_exact compares the approximate modal strategy with "
     "the exact one; the strategy here is flash, exact already"),
    (["--compare_exact", "--strategy", "lazy"], "the strategy here is lazy, exact already"),
    (["--compare_lazy"], "error: --compare_lazy checks an exact strategy against lazy "
     "(identical text); modal is approximate: use --compare_exact."),
    (["--compare_exact", "--num_tokens", "100"], "error: --compare_exact also runs flash, exact, "
     "which cannot go past l_max: the prompt (4 tokens) and 100 new "
     "tokens need 103 positions, more than the model's maximum length l_max = 64"),
])
def test_comparison_errors(capsys, distilled_dirs, argv, message):
  code, out, err = _generate(capsys, "--checkpoint", str(distilled_dirs["random"]), "--prompt",
                             "def ", "--num_tokens", "8", *argv)
  assert code == 2 and out == ""
  assert message in err
  assert err.rstrip().splitlines()[-1].startswith("lcsm-generate: error: ")


def test_modal_without_distilled_filters_is_refused(capsys, checkpoints):
  dirs, _ = checkpoints
  code, out, err = _generate(capsys, "--checkpoint", str(dirs["random"]), "--strategy", "modal")
  assert code == 2 and out == ""
  assert err.rstrip() == (f"lcsm-generate: error: --strategy modal runs distilled filters, and "
                          f"{dirs['random']} holds none; make them with lcsm-distill (--order N "
                          "or --tol T) --out DIR and pass --checkpoint DIR.")
  code, out, err = _generate(capsys, "--strategy", "modal")
  assert code == 2 and "and the shipped byte-level LM has none" in err


def test_a_plain_directory_still_runs_flash(capsys, checkpoints):
  dirs, params = checkpoints
  code, out, err = _generate(capsys, "--checkpoint", str(dirs["random"]), "--prompt", "def ",
                             "--num_tokens", "6", "--temperature", "0")
  assert code == 0, err
  assert "strategy flash, seed 0" in err and "distilled" not in err
  greedy = lcsm_jax.generate(params["random"], CONFIG, text.encode("def ")[None], 6,
                             temperature=0)
  assert out == "def " + text.decode(np.asarray(greedy.tokens[0])) + "\n"


def test_next_token_kl_and_first_difference():
  # p = (1/4, 3/4), q = (1/2, 1/2): KL = 1/4 ln(1/2) + 3/4 ln(3/2).
  kl = generate_cli.next_token_kl(np.array([[0.0, math.log(3)], [1.0, 2.0]]),
                                  np.array([[5.0, 5.0], [1.0, 2.0]]))
  np.testing.assert_allclose(kl, [0.25 * math.log(0.5) + 0.75 * math.log(1.5), 0.0], atol=1e-15)
  assert generate_cli.first_difference(np.array([1, 2, 3]), np.array([1, 2, 4])) == 2
  assert generate_cli.first_difference(np.array([1, 2]), np.array([1, 2])) is None


@pytest.mark.slow
def test_shipped_model_end_to_end(capsys, tmp_path):
  """The shipped byte LM at order 16: saved, then sampled by modal and compared with flash."""
  out = tmp_path / "byte_lm_16"
  code, stdout, err = _distill(capsys, "--order", "16", "--out", str(out))
  assert code == 0, err
  assert "distilled 4 streams x 128 channels, 1024 taps, order 16" in stdout
  report = io.load_distilled(out).report
  json.dumps(report)
  code, text_out, err = _generate(capsys, "--checkpoint", str(out), "--num_tokens", "64",
                                  "--compare_exact")
  assert code == 0, err
  assert text_out.startswith("def ")
  equal, total, first, mean_kl, _ = _agreement(err)
  assert total == 64 and 0 <= equal <= 64
  assert 0 < mean_kl < 0.1  # order 16 keeps the next-token distributions close (0.013 measured)
