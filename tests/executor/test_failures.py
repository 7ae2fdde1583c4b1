"""What goes wrong at tp > 1: splits that cannot be made fail when the config is built, a dead
rank is named by check_health(), a step in flight fails within seconds instead of hanging, and
no rank outlives shutdown() or its parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from pagedllm.core.scheduler import ScheduledSeq, SchedulerOutput
from pagedllm.core.sequence import Sequence, SequenceGroup
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.executor import create_executor
from pagedllm.layers.sampler import SamplingMetadata
from pagedllm.sampling_params import SamplingParams
from pagedllm.worker import model_runner

LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=72,
             intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, vocab_size=500,
             rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)


def model_dir(tmp_path, **overrides) -> str:
    path = tmp_path / ("m_" + "_".join(f"{k}{v}" for k, v in overrides.items()))
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**LLAMA, **overrides}))
    return str(path)


def config(path: str, tp: int = 2, **kw):
    return EngineArgs(model=path, load_format="dummy", device=kw.pop("device", "cpu"),
                      dtype="float32", tensor_parallel_size=tp, num_gpu_blocks_override=16,
                      swap_space=0, **kw).create_engine_config()


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if any rank starts loading a model (the check must come first)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration was checked")

    monkeypatch.setattr(model_runner.ModelRunner, "__init__", refuse)


@pytest.mark.parametrize("overrides, tp, message", [
    (dict(num_attention_heads=9, num_key_value_heads=3, hidden_size=72), 2,
     r"num_attention_heads \(9\) must be divisible by tensor_parallel_size \(2\)"),
    (dict(num_attention_heads=6, num_key_value_heads=3), 2,
     r"num_key_value_heads \(3\) and tensor_parallel_size \(2\)"),
    (dict(intermediate_size=130), 4,
     r"intermediate_size \(130\) must be divisible by tensor_parallel_size \(4\)"),
])
def test_unsupported_split_fails_when_the_config_is_built(tmp_path, no_model_load, overrides,
                                                          tp, message):
    path = model_dir(tmp_path, **overrides)
    with pytest.raises(ValueError, match=message):
        config(path, tp=tp)
    config(path, tp=1)  # the same model is fine unsplit


def test_backend_choice_is_checked(tmp_path, no_model_load):
    path = model_dir(tmp_path)
    with pytest.raises(ValueError, match=r"'uni'.*tensor_parallel_size=2"):
        config(path, distributed_executor_backend="uni")
    with pytest.raises(ValueError, match="distributed_executor_backend must be one of"):
        config(path, distributed_executor_backend="threads")
    assert config(path, tp=1).parallel.distributed_executor_backend == "uni"
    parser = EngineArgs.add_cli_args(__import__("argparse").ArgumentParser())
    args = EngineArgs.from_cli_args(parser.parse_args(
        ["--distributed-executor-backend", "ray", "-tp", "2"]))
    assert (args.distributed_executor_backend, args.tensor_parallel_size) == ("ray", 2)


def test_more_ranks_than_cuda_devices_fails_before_loading(tmp_path, no_model_load):
    import torch

    tp = max(2, torch.cuda.device_count() + 1)
    if 4 % tp:  # the model has 4 heads
        pytest.skip(f"{tp - 1} CUDA devices: the tiny model cannot be split {tp} ways")
    cfg = config(model_dir(tmp_path), tp=tp, device="cuda")
    assert cfg.enforce_eager and not cfg.async_scheduling  # turned off at tp > 1, logged
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(\d+\) is larger than the "
                                         r"number of usable CUDA devices"):
        create_executor(cfg)


def one_step(executor) -> SchedulerOutput:
    seq = Sequence(0, list(range(3, 40)))
    out = SchedulerOutput(scheduled=[ScheduledSeq(seq, SequenceGroup("a", [seq], None), 37,
                                                  [0, 1, 2])])
    return out, SamplingMetadata.build([SamplingParams(temperature=0.0)], [None],
                                       [seq.token_ids], [[]], None, executor.device)


def children() -> set[int]:
    """Our child processes, but multiprocessing's resource tracker: spawn starts it once and
    it lives as long as this process does."""
    return {p.pid for p in psutil.Process().children(recursive=True)
            if "resource_tracker" not in " ".join(p.cmdline())}


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_killed_worker_fails_the_step_in_flight_and_leaves_nothing(tmp_path):
    before = children()
    ex = create_executor(config(model_dir(tmp_path)))
    ex.init_cache(16, 0)
    out, sampling = one_step(ex)
    assert ex.execute_model(out, sampling, None).sampler_output.sampled_token_ids
    worker = ex.pids[1]
    assert worker in children() - before

    # Stop rank 1, so that rank 0's next step surely waits inside a collective, then kill it.
    os.kill(worker, signal.SIGSTOP)
    result: dict = {}

    def step() -> None:
        t0 = time.monotonic()
        try:
            ex.execute_model(out, sampling, None)
        except RuntimeError as e:
            result["error"] = str(e)
        result["seconds"] = time.monotonic() - t0

    thread = threading.Thread(target=step)
    thread.start()
    time.sleep(1.0)
    assert thread.is_alive()  # blocked on the stopped rank
    os.kill(worker, signal.SIGKILL)
    t_kill = time.monotonic()
    thread.join(30)
    assert not thread.is_alive(), "the step in flight hung after its peer died"
    assert time.monotonic() - t_kill < 10
    assert "rank 1" in result["error"]
    with pytest.raises(RuntimeError, match="rank 1 is gone"):
        ex.check_health()
    with pytest.raises(RuntimeError, match="rank 1"):
        ex.execute_model(out, sampling, None)  # refused at once, no collective
    ex.shutdown()
    ex.shutdown()  # twice is fine
    assert gone(worker)
    assert children() <= before


def test_shutdown_stops_every_rank(tmp_path):
    before = children()
    ex = create_executor(config(model_dir(tmp_path, num_attention_heads=6, num_key_value_heads=3,
                                          intermediate_size=192), tp=3))
    workers = [ex.pids[1], ex.pids[2]]
    assert ex.determine_num_blocks() == 16
    ex.check_health()
    t0 = time.monotonic()
    ex.shutdown()
    assert time.monotonic() - t0 < 10
    assert all(gone(pid) for pid in workers)
    assert children() <= before


_DRIVER = """
import sys
from pagedllm.engine.arg_utils import EngineArgs
from pagedllm.executor import create_executor
if __name__ == "__main__":
    cfg = EngineArgs(model=sys.argv[1], load_format="dummy", device="cpu",
                     tensor_parallel_size=2, num_gpu_blocks_override=16,
                     swap_space=0).create_engine_config()
    ex = create_executor(cfg)
    print(ex.pids[1], flush=True)
    sys.stdin.read()  # until killed
"""


def test_workers_die_with_their_parent(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    driver = subprocess.Popen([sys.executable, str(script), model_dir(tmp_path)],
                              stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
    try:
        worker = int(driver.stdout.readline())
        assert not gone(worker)
        driver.kill()  # SIGKILL: no shutdown(), no atexit: only PR_SET_PDEATHSIG is left
        driver.wait(10)
        deadline = time.monotonic() + 10
        while not gone(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gone(worker)
    finally:
        driver.kill()
