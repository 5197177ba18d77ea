"""Tensor parallelism in one server: the engine (rank 0) starts N-1 worker processes, each holding one
shard of the model (transformers' tensor-parallel plan over torch.distributed: NCCL on CUDA, gloo on
CPU), and every forward pass runs on all N ranks at once.

Rank 0 alone schedules, samples and streams. Before each forward it sends every worker the step's
small inputs (token ids, positions, slots, block tables, row lengths; never a Sequence), down one pipe
per worker; the worker runs ModelRunner.execute on them and drops the logits. Each rank's KV pool holds
its share of the KV heads in the same blocks, so one block table serves every rank.

  rank 0 -> worker   (cfg, log level, rank, world size, store port) once; then ("step", fields of
                     SchedulerOutput), ("moves", offloads, reloads, copies) and finally ("stop",)

The pipes, not a collective, carry the steps: a worker waits on its pipe for as long as the server is
idle (a collective would time out), and the pipe's end tells it the engine is gone. A worker that dies
takes the engine down: in the engine process at once (its API process then fails the requests and
exits non-zero), elsewhere (the offline LLM) at the next step, with WorkerGroupError.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from kvserve import kv_sizing, loader
from kvserve.cache.backends import select_backend
from kvserve.cache.kv_pool import KVPool, KVSpec
from kvserve.config import EngineConfig
from kvserve.runner import ModelRunner
from kvserve.scheduler.scheduler import SchedulerOutput

log = logging.getLogger("kvserve")

STEP_FIELDS = ("num_tokens", "context_lens", "block_tables", "num_decodes", "sample_rows", "prompt_logprob_rows",
               "input_ids", "positions", "slot_mapping")
# Like the engine process: `python -c` with the parent's sys.path, not multiprocessing's spawn, which
# re-imports the caller's __main__ (a user's script without a __main__ guard would run again).
_BOOT = "import sys, json; sys.path[:] = json.loads(sys.argv[1]); from kvserve.distributed import _boot; _boot()"

# The engine process sets this: a dead worker ends it at once. Elsewhere the next step raises instead.
exit_on_worker_death = False


class WorkerGroupError(BaseException):
    """The tensor-parallel group broke (a worker died, or a forward failed on a rank). Not an Exception:
    kvserve.isolation must not retry the step, since the ranks may have left a collective half done."""


def check(cfg: EngineConfig, hf_config, cuda_devices: int) -> None:
    """Refuse what cannot be sharded over cfg.tensor_parallel_size ranks, with the reason."""
    n = cfg.tensor_parallel_size
    text = hf_config.get_text_config()
    if not getattr(text, "base_model_tp_plan", None):
        raise ValueError(f"--tensor-parallel-size {n}: {cfg.model} ({text.model_type}) has no tensor-parallel plan "
                         "in transformers (base_model_tp_plan); serve it with --tensor-parallel-size 1")
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads % n or kv_heads % n:
        raise ValueError(f"--tensor-parallel-size {n} must divide the model's attention heads ({heads}) and KV "
                         f"heads ({kv_heads})")
    device = cfg.device
    if device.startswith("cuda") or (device == "auto" and cuda_devices):
        if device not in ("auto", "cuda"):
            raise ValueError(f"--tensor-parallel-size {n} runs rank r on cuda:r: pass --device cuda (choose the GPUs "
                             f"with CUDA_VISIBLE_DEVICES), not {device}")
        if n > cuda_devices:
            raise ValueError(f"--tensor-parallel-size {n} needs {n} CUDA devices; torch sees {cuda_devices}")
    elif cuda_devices:
        raise ValueError(f"--tensor-parallel-size {n} on CPU needs a host where torch sees no CUDA device (hide "
                         "them with CUDA_VISIBLE_DEVICES=)")
    if not shards_on_load():
        import transformers
        raise ValueError(f"--tensor-parallel-size {n} needs transformers 5.13 or later, whose DistributedConfig "
                         f"takes tp_size; this is transformers {transformers.__version__} (pip install -U "
                         "'transformers<6'), or serve with --tensor-parallel-size 1")


def shards_on_load() -> bool:
    """Whether the installed transformers loads one shard per rank from DistributedConfig(tp_size=N), as
    loader.load asks it to: 5.13 and later (inspected, not read from the version)."""
    import inspect

    from transformers.distributed import DistributedConfig
    return "tp_size" in inspect.signature(DistributedConfig).parameters


def launch(cfg: EngineConfig) -> WorkerGroup | None:
    """Rank 0's start: check the model, start the workers, join the process group. None without TP.
    CUDA graphs are turned off in cfg (decode steps run eagerly on every rank)."""
    if cfg.tensor_parallel_size == 1:
        return None
    from transformers import AutoConfig
    if dist.is_available() and dist.is_initialized():
        raise ValueError("a process group already exists in this process: one tensor-parallel engine per process")
    hf_config = AutoConfig.from_pretrained(cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    check(cfg, hf_config, cuda_devices)
    if cfg.cuda_graphs:
        log.warning("CUDA graphs are off under tensor parallel: decode steps run eagerly on every rank")
    cfg.cuda_graphs = False
    os.environ["LOCAL_RANK"] = "0"      # transformers puts a rank's shard on device LOCAL_RANK: this is rank 0
    # the ranks talk over loopback only (gloo and NCCL's sockets would pick the hostname's interface);
    # the workers inherit these
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    return WorkerGroup(cfg, "nccl" if cuda_devices else "gloo")


class WorkerGroup:
    """Rank 0's side of the group: the worker processes, their pipes, and a watch on each."""

    def __init__(self, cfg: EngineConfig, backend: str):
        self.world_size = cfg.tensor_parallel_size
        self.backend = backend
        self.error: str | None = None
        self.closed = False
        self.procs: list[subprocess.Popen] = []
        self.pipes: list[Connection] = []
        # the store listens on a socket bound here, to loopback only (given a host, torch's store would still
        # listen on every interface), on a port the OS picks and that is never free for another process to take
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            store = dist.TCPStore("127.0.0.1", listener.getsockname()[1], self.world_size, is_master=True,
                                  wait_for_workers=False, master_listen_fd=listener.fileno())
            listener.detach()           # the store owns the socket now, and closes it
        threads = torch.get_num_threads()
        level = logging.getLogger("kvserve").getEffectiveLevel()
        try:
            for rank in range(1, self.world_size):
                worker_cfg = dataclasses.replace(cfg, device=f"cuda:{rank}") if backend == "nccl" else cfg
                self._start(rank, (worker_cfg, level, rank, self.world_size, store.port, backend, threads))
            for rank, proc in enumerate(self.procs, start=1):
                threading.Thread(target=self._watch, args=(rank, proc), name=f"kvserve-tp-watch-{rank}",
                                 daemon=True).start()
            _init_process_group(backend, store, 0, self.world_size)
        except BaseException:
            self.close()
            raise
        self.threads = threads
        if backend == "gloo":   # the ranks share the host's cores
            torch.set_num_threads(max(1, threads // self.world_size))
        atexit.register(self.close)
        log.info("tensor parallel: %d ranks over %s, %d worker processes (pids %s), %d torch threads each",
                 self.world_size, backend, len(self.procs), ", ".join(str(p.pid) for p in self.procs),
                 torch.get_num_threads())

    def _start(self, rank: int, hello: tuple) -> None:
        read, write = os.pipe()
        try:
            proc = subprocess.Popen([sys.executable, "-c", _BOOT, json.dumps(sys.path), str(read), str(os.getpid())],
                                    pass_fds=(read,), stdin=subprocess.DEVNULL)
        except BaseException:
            os.close(write)
            raise
        finally:
            os.close(read)
        self.procs.append(proc)
        self.pipes.append(Connection(write, readable=False))
        self.pipes[-1].send_bytes(pickle.dumps(hello, protocol=pickle.HIGHEST_PROTOCOL))

    def _watch(self, rank: int, proc: subprocess.Popen) -> None:
        code = proc.wait()
        if self.closed:
            return
        self.error = f"tensor-parallel worker rank {rank} (pid {proc.pid}) exited with status {code}"
        log.error("%s: the engine stops", self.error)
        if exit_on_worker_death:
            for other in self.procs:
                if other.poll() is None:
                    other.kill()
            logging.shutdown()
            os._exit(1)

    def runner(self, model, kv_pool: KVPool, backend) -> TensorParallelRunner:
        return TensorParallelRunner(model, kv_pool, backend, self)

    def send(self, message: tuple) -> None:
        """One message to every worker; raises WorkerGroupError once a worker is gone."""
        if self.error is not None or self.closed:
            raise WorkerGroupError(self.error or "the tensor-parallel workers were stopped")
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for pipe in self.pipes:
                pipe.send_bytes(data)
        except OSError as exc:
            raise WorkerGroupError(self.error or f"a tensor-parallel worker is gone: {exc}") from None

    def fail(self, what: str, exc: BaseException) -> WorkerGroupError:
        """Rank 0 broke off a step the workers run too: they may be waiting in one of its collectives, and
        the next step's would pair with those. The group is stopped for good (workers killed)."""
        self.error = f"a tensor-parallel {what} failed on rank 0: {type(exc).__name__}: {exc}"
        log.error("%s: the workers are stopped", self.error)
        self.close(timeout=0.5)
        return WorkerGroupError(self.error)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers (stop message, then terminate, then kill) and leave the process group."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        for pipe in self.pipes:
            try:
                pipe.send_bytes(pickle.dumps(("stop",)))
                pipe.close()
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            for stop in (None, proc.terminate, proc.kill):
                if stop is not None:
                    stop()
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()) if stop is None else 2.0)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if dist.is_initialized():
            dist.destroy_process_group()
        if hasattr(self, "threads"):
            torch.set_num_threads(self.threads)


class TensorParallelRunner(ModelRunner):
    """Rank 0's runner: every forward and block move is sent to the workers first, then run here.
    A forward that fails here fails the engine (WorkerGroupError): the workers may be inside it still."""

    def __init__(self, model, kv_pool: KVPool, backend, group: WorkerGroup):
        super().__init__(model, kv_pool, backend)
        self.group = group

    def move_blocks(self, step: SchedulerOutput) -> None:
        if step.kv_moves:
            self.group.send(("moves", *step.kv_moves))
        try:
            super().move_blocks(step)
        except BaseException as exc:
            raise self.group.fail("block moves", exc) from exc

    def execute(self, step: SchedulerOutput) -> torch.Tensor:
        self.group.send(("step", tuple(getattr(step, name) for name in STEP_FIELDS)))
        try:
            return super().execute(step)
        except BaseException as exc:     # a Ctrl-C too: the workers may be inside the forward's collectives
            raise self.group.fail("forward", exc) from exc


def local_kv_spec(spec: KVSpec, model) -> KVSpec:
    """The KV heads this rank's attention sees (kv_heads_per_rank under the model's plan)."""
    size = getattr(model, "tp_size", None) or 1
    if size == 1:
        return spec
    heads = kv_heads_per_rank(model.tp_plan, spec.num_kv_heads, size)
    if heads is None:
        raise ValueError(f"{spec.num_kv_heads} KV heads cannot be split over {size} ranks")
    return dataclasses.replace(spec, num_kv_heads=heads)


KEY_PROJECTIONS = ("k_proj", "qkv_proj", "query_key_value")   # modules whose output holds the attention keys


def kv_heads_per_rank(tp_plan: dict[str, str], num_kv_heads: int, size: int) -> int | None:
    """The KV heads one of `size` ranks holds under `tp_plan`: num_kv_heads / size where the plan shards a
    key projection by columns ("colwise": Llama, Qwen, Mistral, Gemma), all of them where it keeps or
    gathers the whole output (Phi-3's fused qkv_proj: "colwise_rep" or "colwise_gather_output", as the
    version names it); None when they do not divide. Read from the plan here, not with
    transformers' own helper, which only its later 5.x releases have (5.17 has none)."""
    sharded = any(key.rsplit(".", 1)[-1] in KEY_PROJECTIONS and style == "colwise" for key, style in tp_plan.items())
    if not sharded:
        return num_kv_heads
    return None if num_kv_heads % size else num_kv_heads // size


def agree(num_blocks: int) -> int:
    """The smallest pool any rank can hold (on CUDA each rank sized its own from its free memory)."""
    if not dist.is_initialized():
        return num_blocks
    value = torch.tensor([num_blocks], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())


def _init_process_group(backend: str, store, rank: int, world_size: int) -> None:
    device_id = torch.device("cuda", rank) if backend == "nccl" else None
    if device_id is not None:
        torch.cuda.set_device(device_id)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, device_id=device_id)


# the worker

def _boot() -> None:
    pipe = Connection(int(sys.argv[2]), writable=False)
    _exit_with_parent(int(sys.argv[3]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C reaches the whole group: the API process decides
    cfg, level, rank, world_size, port, backend, threads = pickle.loads(pipe.recv_bytes())
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s %(name)s[tp{rank}]: %(message)s")
    os.environ["LOCAL_RANK"] = str(rank)            # transformers puts rank r's shard on device r
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False)
        _init_process_group(backend, store, rank, world_size)
        if backend == "gloo":
            torch.set_num_threads(max(1, threads // world_size))   # rank 0's count (set by the caller), shared
        runner = _build_runner(cfg)
        _serve(runner, pipe)
        dist.destroy_process_group()
    except EOFError:          # the engine is gone: nothing is left to run
        raise SystemExit(0) from None
    except BaseException:
        log.exception("tensor-parallel worker rank %d died", rank)
        raise SystemExit(1) from None


def _exit_with_parent(parent: int) -> None:
    """Exit within a second of the engine process's end, whatever this process is blocked in."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)
    if os.getppid() != parent:
        raise SystemExit(1)
    threading.Thread(target=watch, name="kvserve-tp-parent", daemon=True).start()


def _build_runner(cfg: EngineConfig) -> ModelRunner:
    """A worker's model, KV pool and runner, built as EngineCore builds rank 0's: every forward and
    collective rank 0 runs while it builds (profiling, warm-up), this runs too, in the same order."""
    model, _, hf_config, device, dtype = loader.load(cfg)
    backend = select_backend(cfg.attention_backend, device)
    spec = local_kv_spec(KVSpec.for_model(hf_config, cfg.block_size, dtype, device), model)
    kv_pool = KVPool(spec, agree(kv_sizing.num_kv_blocks(cfg, spec, model, False)),
                     kv_sizing.num_host_blocks(cfg, spec))
    runner = ModelRunner(model, kv_pool, backend)
    runner.warmup()
    return runner


def _serve(runner: ModelRunner, pipe: Connection) -> None:
    while True:
        kind, *body = pickle.loads(pipe.recv_bytes())
        if kind == "step":
            runner.execute(SchedulerOutput(**dict(zip(STEP_FIELDS, body[0]))))
        elif kind == "moves":
            runner.kv_pool.move_blocks(*body)
        elif kind == "stop":
            return
