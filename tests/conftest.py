"""Test-wide settings: 8 fake CPU devices for sharding tests, strict rank promotion."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# The suite's own temp dir, for it and its child processes, so the check below
# sees only what the tests leave (other programs share the system one).
SUITE_TMP = tempfile.mkdtemp(prefix="t5align-tests-")
os.environ["TMPDIR"] = SUITE_TMP
tempfile.tempdir = SUITE_TMP

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session", autouse=True)
def leaves_nothing_in_the_temp_dir():
  """Fails the session if a test, or the code under test, leaves files in the temp dir.

  pytest's own ``tmp_path`` directories (``pytest-of-<user>``) are expected, and so
  are the caches libraries keep for the life of the process and remove at exit:
  TensorFlow autograph's generated sources and torch inductor's cache (the
  directory itself is removed below either way).
  """
  yield
  library_caches = ("pytest-of-", "__autograph_generated_file", "torchinductor_")
  left = sorted(n for n in os.listdir(SUITE_TMP) if not n.startswith(library_caches))
  assert not left, f"left in the temp dir {SUITE_TMP}: {left}"
  shutil.rmtree(SUITE_TMP, ignore_errors=True)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def run_two_processes():
  """Runs a command as processes 0 and 1 of one CPU job, 4 fake devices each.

  ``run(argv_of, timeout=..., env={})`` starts ``argv_of(port, process_id)``
  for both ids with a free coordinator port, waits, and asserts that each exits
  0 after printing ``process <id> ok``; on a timeout both are killed.
  """
  def run(argv_of, *, timeout, env=None):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    full_env = dict(os.environ, JAX_PLATFORMS="cpu",
                    XLA_FLAGS="--xla_force_host_platform_device_count=4", **(env or {}))
    full_env.pop("JAX_COORDINATOR_ADDRESS", None)
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (REPO_ROOT, full_env.get("PYTHONPATH")) if p)
    procs = [subprocess.Popen(argv_of(port, i), env=full_env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = []
    for proc in procs:
      try:
        outputs.append(proc.communicate(timeout=timeout)[0])
      except subprocess.TimeoutExpired:
        for p in procs:
          p.kill()
        raise
    for i, (proc, out) in enumerate(zip(procs, outputs)):
      assert proc.returncode == 0 and f"process {i} ok" in out, out[-3000:]
  return run
