"""`lcsm-generate` (lcsm_jax/cli/generate.py): streamed exact text from one continued decoder state,
lazy comparison, HyenaDNA checkpoints, clean errors, the console-script entry."""

import collections
import pathlib
import re
import subprocess
import sys
import tomllib

import jax
import numpy as np
import pytest

import lcsm_jax
from lcsm_jax import text
from lcsm_jax.cli import generate as cli
from lcsm_jax.decoding import memory
from lcsm_jax.decoding import session
from lcsm_jax.io import pretrained

ROOT = pathlib.Path(__file__).parent.parent
# HyenaDNA's CharacterTokenizer (hyena-dna, hg38_char_tokenizer.py): 7 special tokens, then
# the characters A, C, G, T, N from id 7. Written out here independently of the CLI.
HYENADNA_IDS = {"A": 7, "C": 8, "G": 9, "T": 10, "N": 11}


def _run(capsys, *argv):
  code = cli.main(list(argv))
  captured = capsys.readouterr()
  return code, captured.out, captured.err


@pytest.fixture(scope="module")
def byte_lm():
  return pretrained.load_byte_lm()


def test_chunked_stream_equals_one_generate_call(capsys, fixture_dir):
  """HyenaDNA fixture, sampled, in two chunks: exactly the text of one `generate` call."""
  code, out, err = _run(capsys, "--checkpoint", str(fixture_dir), "--prompt", "acgtnA",
                        "--num_tokens", "12", "--chunk_tokens", "6", "--seed", "3",
                        "--temperature", "1.5", "--top_k", "6")
  assert code == 0, err
  assert "vocabulary 12, HyenaDNA characters" in err
  assert "[flash: 6/12 tokens" in err and "[flash: 12/12 tokens" in err  # stdout not a tty
  assert "flash: 12 tokens in" in err and "tokens/s (2 calls; compile" in err
  assert "lazy" not in err
  config, params = lcsm_jax.load_hyenadna(fixture_dir)
  prompt = np.array([[HYENADNA_IDS[c] for c in "ACGTNA"]])
  expected = np.asarray(lcsm_jax.generate(params, config, prompt, 12, jax.random.key(3),
                                          temperature=1.5, top_k=6).tokens[0])
  names = ["[CLS]", "[SEP]", "[BOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]", "A", "C", "G",
           "T", "N"]
  assert out == "ACGTNA" + "".join(names[i] for i in expected) + "\n"
  assert len(set(expected.tolist())) > 2  # really sampled, not a constant run


def test_every_chunking_prints_the_text_of_one_call(capsys, byte_lm):
  """Chunks of 1, 7 (not dividing 24), 8 and 24 tokens continue one decoder state: the text of
  --chunk_tokens 0 and of `lcsm_jax.generate` with the same seed (sampled, top-k and top-p)."""
  config, params, _ = byte_lm
  expected = np.asarray(lcsm_jax.generate(
      params, config, text.encode("for ")[None], 24, jax.random.key(11), temperature=1.2,
      top_k=50, top_p=0.95).tokens[0])
  assert len(set(expected.tolist())) > 5  # really sampled, not a constant run
  argv = ["--prompt", "for ", "--num_tokens", "24", "--seed", "11", "--temperature", "1.2",
          "--top_k", "50", "--top_p", "0.95", "--no_memory_check"]
  for chunk, calls in [("0", "1 call"), ("1", "24 calls"), ("7", "4 calls"), ("8", "3 calls"),
                       ("24", "1 call")]:
    code, out, err = _run(capsys, *argv, "--chunk_tokens", chunk)
    assert code == 0, err
    assert out == "for " + text.decode(expected) + "\n", f"--chunk_tokens {chunk}"
    assert "flash: 24 tokens in" in err and f"tokens/s ({calls}; compile" in err, err


def test_a_run_computes_the_tables_once_and_compiles_once_per_chunk_size(capsys, monkeypatch):
  """12 tokens in chunks of 5, 5 and 2: one table computation, one prefill, three generate
  calls continuing its state, two generation programs (5 tokens, 2 tokens). Counted by
  wrapping every compiled program the decoder runs."""
  executed = collections.Counter()
  compile_program = session.compile_program

  class Counted:
    def __init__(self, key, compiled):
      self.key, self.compiled = key, compiled

    def __call__(self, *args):
      executed[self.key] += 1
      return self.compiled(*args)

    def __getattr__(self, name):  # memory_analysis, ...
      return getattr(self.compiled, name)

  def counting(program, static, sig):
    return Counted((program.__name__, static), compile_program(program, static, sig))

  monkeypatch.setattr(session, "compile_program", counting)
  code, out, err = _run(capsys, "--prompt", "while ", "--num_tokens", "12", "--chunk_tokens", "5")
  assert code == 0, err
  assert out.startswith("while ") and "(3 calls; compile" in err
  runs = collections.Counter()
  sizes = collections.Counter()
  for (name, static), count in executed.items():
    runs[name] += count
    if name == "_generate":
      sizes[dict(static)["num_tokens"]] += count
  assert runs == {"_prepare": 1, "_prefill": 1, "_generate": 3}
  assert sizes == {5: 2, 2: 1}


def test_compare_lazy_reports_identical_text_and_speedup(capsys, byte_lm):
  config, params, _ = byte_lm
  argv = ["--prompt", "import ", "--num_tokens", "16", "--chunk_tokens", "0", "--temperature",
          "0"]
  code, out, err = _run(capsys, *argv)
  assert code == 0, err
  greedy = lcsm_jax.generate(params, config, text.encode("import ")[None], 16, temperature=0)
  assert out == "import " + text.decode(np.asarray(greedy.tokens[0])) + "\n"
  code, out_again, err = _run(capsys, *argv, "--compare_lazy")
  assert code == 0, err
  assert out_again == out
  assert "lazy text identical to flash: yes" in err
  assert "flash speed-up over lazy: " in err and "x (compile time not counted)" in err
  lines = {line.split(":")[0]: line for line in err.splitlines()}
  for strategy in ("flash", "lazy"):
    assert "16 tokens in" in lines[strategy] and "tokens/s (1 call; compile" in lines[strategy]
  # The second run reused the compiled flash programs: its compile time is the memory check's
  # tracing of shapes only (0.1-0.2 s; a compilation of the generation program takes >= 1 s).
  assert float(re.search(r"compile (\S+) s", lines["flash"]).group(1)) <= 0.5, lines["flash"]


def test_tokenizers():
  dna = text.CharacterTokenizer()
  np.testing.assert_array_equal(dna.encode("AcGtN"), [7, 8, 9, 10, 11])
  assert dna.decoder()(np.array([7, 11, 0, 6]), True) == "AN[CLS][UNK]"
  with pytest.raises(ValueError, match="does not know: 'U'"):
    dna.encode("ACGU")
  decode = text.ByteTokenizer().decoder()
  snake = "é🐍".encode("utf-8")
  # A character split between chunks comes out whole, once.
  assert decode(np.frombuffer(snake[:3], np.uint8), False) == "é"
  assert decode(np.frombuffer(snake[3:], np.uint8), True) == "🐍"
  config = lcsm_jax.HyenaConfig(vocab_size=13)
  with pytest.raises(ValueError, match="no tokenizer is known for a vocabulary of 13 ids"):
    text.tokenizer_for(config)


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "/no/such/checkpoint"], "error: no checkpoint at '/no/such/checkpoint'"),
    (["--prompt", "x" * 1100], "error: the prompt (1100 tokens) and 200 new tokens need 1299 "
     "positions, more than the model's maximum length l_max = 1024"),
    (["--num_tokens", "1024", "--prompt", "ab"], "maximum length l_max = 1024"),
    (["--prompt", ""], "error: the prompt is empty"),
    (["--bogus"], "error: unrecognized arguments: --bogus"),
    (["--top_p", "1.5"], "error: argument --top_p: must lie in (0, 1], got 1.5"),
    (["--num_tokens", "0"], "error: argument --num_tokens: must be >= 1, got 0"),
    (["--temperature", "nan"], "error: argument --temperature: expected a finite number"),
    (["--strategy", "fast"], "error: argument --strategy: invalid choice: 'fast'"),
    (["--tau", "big"], "error: argument --tau: tau must be one of auto, direct, fft, pallas or "
     "an integer block size >= 0, got 'big'."),
    (["--tau", "-1"], "error: argument --tau: tau must be one of"),
    (["--seed", "1.5"], "error: argument --seed: expected an integer, got '1.5'"),
])
def test_errors_are_clean_messages(capsys, argv, message):
  code, out, err = _run(capsys, *argv)
  assert code == 2
  assert message in err
  assert err.rstrip().splitlines()[-1].startswith("lcsm-generate: error: ")
  assert "Traceback" not in err
  assert out == ""  # nothing printed before the input was checked


@pytest.mark.parametrize("seed", [str(2**63), "18446744073709551616", str(-2**63 - 1)])
def test_seed_outside_what_jax_accepts_is_refused_by_argparse(capsys, seed):
  """It used to crash in jax.random.key (OverflowError, exit 1) after printing the prompt."""
  code, out, err = _run(capsys, "--seed", seed)
  assert code == 2
  assert out == ""
  assert err.rstrip().splitlines()[-1] == (
      "lcsm-generate: error: argument --seed: must lie in [-2**63, 2**63 - 1] = "
      f"[-9223372036854775808, 9223372036854775807] (what jax.random.key accepts), got {seed}")


def test_seed_range_is_what_jax_accepts():
  """Both ends are accepted by the parser and by jax.random.key; one past either end is not
  accepted by jax (so the parser refuses it, above)."""
  parser = cli.build_parser()
  for seed in (-2**63, 2**63 - 1):
    assert parser.parse_args(["--seed", str(seed)]).seed == seed
    jax.random.key(seed)
  for seed in (-2**63 - 1, 2**63):
    with pytest.raises(OverflowError, match="too large to convert"):
      jax.random.key(seed)
  # --help says: without 64-bit JAX only the seed's low 32 bits count.
  np.testing.assert_array_equal(jax.random.key_data(jax.random.key(2**32 + 5)),
                                jax.random.key_data(jax.random.key(5)))


def test_bad_checkpoint_directory(capsys, tmp_path, fixture_dir):
  code, _, err = _run(capsys, "--checkpoint", str(tmp_path))
  assert code == 2 and f"error: {tmp_path} holds none of the weight files" in err
  (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
  code, _, err = _run(capsys, "--checkpoint", str(tmp_path))
  assert code == 2 and "error: no config.json" in err
  (tmp_path / "config.json").write_text((fixture_dir / "config.json").read_text())
  code, _, err = _run(capsys, "--checkpoint", str(tmp_path))
  assert code == 2 and "not a readable safetensors file" in err
  assert "Traceback" not in err


def test_help(capsys):
  code, out, _ = _run(capsys, "--help")
  assert code == 0
  for flag in ("--checkpoint", "--prompt", "--num_tokens", "--temperature", "--top_k",
               "--top_p", "--seed", "--strategy", "--tau", "--compare_lazy", "--chunk_tokens"):
    assert flag in out
  assert "an integer in [-2**63, 2**63 - 1]" in " ".join(out.split())


def test_console_script_is_registered():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
  assert project["scripts"]["lcsm-generate"] == "lcsm_jax.cli.generate:main"


def test_subprocess_end_to_end():
  result = subprocess.run(
      [sys.executable, "-m", "lcsm_jax.cli", "--prompt", "class ", "--num_tokens", "12",
       "--seed", "5"],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("class ") and result.stdout.endswith("\n")
  assert "flash: 12 tokens in" in result.stderr and "tokens/s" in result.stderr
  assert "Traceback" not in result.stderr


def test_a_run_that_does_not_fit_is_refused_before_any_text(capsys, monkeypatch):
  monkeypatch.setattr(memory, "available_bytes", lambda device=None: (50_000, "a test limit"))
  argv = ["--prompt", "ab", "--num_tokens", "4", "--chunk_tokens", "0", "--temperature", "0"]
  code, out, err = _run(capsys, *argv)
  assert code == 2 and out == ""
  assert "lcsm-generate: error: this run needs an estimated" in err
  assert "more than the 48.8 KiB of a test limit" in err
  code, out, err = _run(capsys, *argv, "--no_memory_check")
  assert code == 0, err
  assert out.startswith("ab") and len(out) > len("ab\n")


def test_extreme_temperatures_are_their_limits_without_warnings(capsys):
  argv = ["--prompt", "def ", "--num_tokens", "24", "--chunk_tokens", "0"]
  code, greedy, _ = _run(capsys, *argv, "--temperature", "0")
  assert code == 0
  code, tiny, err = _run(capsys, *argv, "--temperature", "1e-40")
  assert code == 0, err
  assert tiny == greedy
  code, hot, err = _run(capsys, *argv, "--temperature", "1e300", "--top_k", "256")
  assert code == 0, err
  assert "Warning" not in err and "overflow" not in err
  assert hot != greedy and len(hot.encode()) >= len("def ")


def test_smooth_prints_the_text_of_the_plain_schedule(capsys, fixture_dir):
  """--smooth (flash's smoothed schedule) and the default (smooth='auto') sample the tokens of
  --no-smooth: 150 tokens reach the levels above 16 positions with tau=4."""
  argv = ["--checkpoint", str(fixture_dir), "--prompt", "acgtnA", "--num_tokens", "150",
          "--seed", "5", "--tau", "4", "--chunk_tokens", "70"]
  code, plain, err = _run(capsys, *argv, "--no-smooth")
  assert code == 0, err
  for flag in ("--smooth", None):
    code, out, err = _run(capsys, *argv, *([flag] if flag else []))
    assert code == 0, err
    assert out == plain and len(plain) > 150, flag
