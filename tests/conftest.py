"""Test-wide settings: 8 fake CPU devices for sharding tests, strict rank promotion."""

import os
import socket
import subprocess
import sys

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


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
