"""The engine core's process: it owns the model, the GPU and the scheduler, and talks in batches.

The API process (kvserve.async_engine) does HTTP, validation, tokenization and detokenization; this
process only steps the EngineCore. Two one-way pipes join them, each message a pickled batch built
by kvserve itself (client input crosses as ids and validated SamplingParams, never as code):

  API -> core   a list of commands: ("add", id, prompt_ids, params, arrival_time, parent_id), ("abort", id),
                ("stop", id) (a stop string ended it), ("kv_snapshot",), ("shutdown",)
  core -> API   ("ready", info) once loaded, or ("error", exception) if loading failed;
                then one ("step", outputs, stats, step_stats, adds_taken) per step, the outputs packed
                by pack_outputs (the CoreOutputs as columns, the refusals) (and one after
                commands that changed something while idle); ("kv_snapshot", json_bytes or the exception,
                seconds_it_took) between two steps when asked (GET /kv); ("dead", message) if the loop dies.

The two never share a GIL, so a busy event loop cannot slow a step and a step cannot stall
/health. If the API process goes away the pipe ends and this process exits; if this process dies
the API process sees its pipe end, fails every request and exits non-zero.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from multiprocessing.connection import Connection

log = logging.getLogger("kvserve")
MAX_MESSAGES_PER_STEP = 64   # command messages (each a batch) taken in between two steps

# The child runs `python -c` with the parent's sys.path, not `multiprocessing`'s spawn: spawn
# re-imports the caller's __main__, which breaks any user script without a __main__ guard.
_BOOT = "import sys, json; sys.path[:] = json.loads(sys.argv[1]); from kvserve.engine_proc import _boot; _boot()"


def start(cfg, log_level: int) -> tuple[subprocess.Popen, Connection, Connection]:
    """Start the engine process: returns it, the connection that sends it commands and the one
    its results arrive on. Its first message is "ready" or "error"."""
    commands_r, commands_w = os.pipe()
    results_r, results_w = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-c", _BOOT, json.dumps(sys.path), str(commands_r), str(results_w),
                                 str(os.getpid())], pass_fds=(commands_r, results_w), stdin=subprocess.DEVNULL)
    except BaseException:
        os.close(commands_w)
        os.close(results_r)
        raise
    finally:
        os.close(commands_r)
        os.close(results_w)
    commands = Connection(commands_w, readable=False)
    commands.send_bytes(pickle.dumps((cfg, log_level), protocol=pickle.HIGHEST_PROTOCOL))
    return proc, commands, Connection(results_r, writable=False)


def _boot() -> None:
    commands = Connection(int(sys.argv[2]), writable=False)
    results = Connection(int(sys.argv[3]), readable=False)
    _die_with_parent(int(sys.argv[4]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C reaches the whole group: the API process decides
    cfg, log_level = pickle.loads(commands.recv_bytes())
    main(cfg, commands, results, log_level)


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this process if the API process dies while the model loads (after loading,
    the end of the command pipe says it). The signal follows the thread that started this process,
    which the caller's loading blocks, so it is switched off once loaded (_keep_after_parent)."""
    _pdeathsig(signal.SIGTERM)
    if os.getppid() != parent:     # the parent died before the line above
        raise SystemExit(0)


def _keep_after_parent() -> None:
    _pdeathsig(0)


def _pdeathsig(sig: int) -> None:
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, sig)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(cfg, commands: Connection, results: Connection, log_level: int) -> None:
    """The engine process: load, say ready (or why not), then serve commands until told to stop."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s[engine]: %(message)s")
    from kvserve import distributed
    from kvserve.engine import EngineCore   # torch and transformers load here, in this process
    distributed.exit_on_worker_death = True  # a dead tensor-parallel worker ends this process, so the API's too
    try:
        core = EngineCore(cfg)
    except BaseException as exc:   # noqa: BLE001 - every load failure goes back to the caller
        _send(results, ("error", _portable(exc)))
        raise SystemExit(1) from None
    info = {"max_model_len": core.max_model_len, "vocab_size": core.runner.vocab_size, "kv_info": core.kv_info,
            "model_config": core.model_config, "pid": os.getpid()}
    gc.collect()
    gc.freeze()     # the model, torch and transformers stay for the process's life: no full GC pass over them
    _keep_after_parent()
    _send(results, ("ready", info, core.stats()))
    try:
        _loop(core, commands, results)
    except (EOFError, BrokenPipeError):   # the API process is gone: nothing is left to serve
        raise SystemExit(0) from None
    except BaseException as exc:          # noqa: BLE001 - the engine died: say so, exit non-zero
        log.exception("the engine loop died")
        try:
            _send(results, ("dead", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
        raise SystemExit(1) from None
    finally:
        gc.unfreeze()


def _loop(core, commands: Connection, results: Connection) -> None:
    adds_taken = 0
    step_stats: list = []
    core.add_step_listener(step_stats.append)
    while True:
        outputs, changed = [], False
        # wait for work only when there is none; otherwise take what has arrived, a bounded number
        # of messages per step (a flood of adds and aborts cannot hold the running requests back)
        taken, snapshot_wanted = 0, False
        while taken < MAX_MESSAGES_PER_STEP and commands.poll(
                None if not core.has_unfinished() and not changed else 0):
            taken += 1
            for cmd in pickle.loads(commands.recv_bytes()):
                kind = cmd[0]
                if kind == "add":
                    adds_taken += 1
                    _, request_id, prompt_ids, params, arrival, parent_id = cmd
                    try:
                        core.add_request(prompt_ids, params, request_id, arrival, parent_id)
                    except Exception as exc:  # noqa: BLE001 - refused alone (the API validated it already)
                        outputs.append((request_id, _portable(exc)))
                elif kind == "abort":
                    out = core.abort(cmd[1])
                    if out is not None:
                        outputs.append(out)
                elif kind == "stop":
                    core.stop(cmd[1])
                elif kind == "kv_snapshot":
                    snapshot_wanted = True
                elif kind == "shutdown":
                    outputs += [core.abort(request_id) for request_id in list(core.requests)]
                    _send(results, ("step", pack_outputs(outputs), core.stats(), None, adds_taken))
                    return
            changed = True
        if snapshot_wanted:   # between two step() calls (with async scheduling, a forward may be running:
            # the map is the scheduler's view, which counts that step's tokens as computed)
            # encoded here, in this process: a 100,000-block map costs the API process no GIL time
            t0 = time.perf_counter()
            try:
                body = json.dumps(core.kv_snapshot(), separators=(",", ":")).encode()
            except Exception as exc:  # noqa: BLE001 - a map that cannot be built fails its callers, not the engine
                log.exception("the KV map could not be built")
                body = _portable(exc)
            _send(results, ("kv_snapshot", body, time.perf_counter() - t0))
        if core.has_unfinished():
            outputs += core.step()
        if outputs or changed or step_stats:    # an empty schedule (nothing fits yet) sends nothing
            _send(results, ("step", pack_outputs(outputs), core.stats(), step_stats[-1] if step_stats else None,
                            adds_taken))
        step_stats.clear()


def pack_outputs(outputs: list) -> tuple[tuple, list]:
    """A step's outputs for the pipe: the CoreOutputs as columns, one tuple per field (a fifth of the
    time to pickle 256 of them as namedtuples: ~40 vs ~220 us), and the refusals, (request_id, error)."""
    from kvserve.engine import CoreOutput
    core = [out for out in outputs if isinstance(out, CoreOutput)]
    return tuple(zip(*core)), [out for out in outputs if not isinstance(out, CoreOutput)]


def unpack_outputs(packed: tuple[tuple, list]) -> list:
    """pack_outputs' inverse (the refusals after the CoreOutputs)."""
    from kvserve.engine import CoreOutput
    columns, refused = packed
    return list(map(CoreOutput._make, zip(*columns))) + refused


def _send(conn: Connection, message) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _portable(exc: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a RuntimeError that names it."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def wait_for_exit(proc: subprocess.Popen, timeout: float) -> None:
    """Wait, then terminate, then kill: the engine process never outlives a shutdown."""
    for stop in (None, proc.terminate, proc.kill):
        if stop is not None:
            stop()
        try:
            proc.wait(timeout if stop is None else 2.0)
            return
        except subprocess.TimeoutExpired:
            continue
