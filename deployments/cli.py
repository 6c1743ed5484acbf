"""The `interplay` command: bring the system up on a Ray cluster and look at it.

`interplay serve` starts (or joins) a Ray cluster and brings up every part on the configured
defaults, printing each part's status (it refuses, before starting anything, a config it must
not serve: see `AppConfig.exposure_error`): the live path and HTTP first ("running"), then the
background pool, with a progress line while it waits for resources or starts, and a line saying
so if it is left off; the parts run until it is stopped (Ctrl-C), and a second
`interplay serve` on the same cluster refuses while they do. `interplay status` reports on a
running one; `interplay call --wav F` calls one over WebRTC with a WAV file and records the reply
(the example client, `examples/call.py`); `interplay eval` scores the model against a VAD harness on
held-out dialogues (`training/evaluate.py`); `interplay train` trains the model that serve
loads by default (`training/train.py`).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time

from .config import AppConfig


def _init_ray(address: str | None) -> None:
    import ray

    from .app import NAMESPACE
    from .proxy import use_in_cluster

    use_in_cluster()  # the WebSocket frame cap, for the Serve proxy of a cluster started here
    print(f"[interplay] starting Ray ({'joining ' + address if address else 'local cluster'}) ...", flush=True)
    t = time.monotonic()
    # No --address: a cluster of our own ("local"), never one some other program on this machine started.
    ray.init(address=address or "local", namespace=NAMESPACE, include_dashboard=False, logging_level=logging.ERROR)
    res = ray.cluster_resources()
    print(f"[interplay] Ray up in {time.monotonic() - t:.1f} s: {res.get('CPU', 0):.0f} CPU, {res.get('GPU', 0):.0f} GPU", flush=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .app import StartupError, build, model_tick_ms, stop, wait_background

    try:
        config = AppConfig.load(args.config)
        if args.port:
            config.http.port = args.port
        if args.host:
            config.http.host = args.host
        model_tick_ms(config)  # refuse a mismatched tick before starting anything
    except (OSError, ValidationError, ValueError, StartupError) as exc:
        print(f"interplay: bad config {args.config or '(defaults)'}: {exc}", file=sys.stderr)
        return 2
    if exposed := config.exposure_error():  # open to the network by mistake: refuse before starting anything
        print(f"interplay: {exposed}", file=sys.stderr)
        return 2
    # A service manager (systemd, Kubernetes, docker stop) stops it with SIGTERM: as Ctrl-C, the
    # parts are taken down and the local cluster with them, not left behind.
    signal.signal(signal.SIGTERM, _interrupt)
    _init_ray(args.address)
    try:
        app = build(config, wait=False)  # the live path; the background pool is still starting
    except StartupError as exc:
        print(f"interplay: {exc}", file=sys.stderr)
        return 2
    for name, status in app.parts.items():
        print(f"[interplay] {name:<12} {status}", flush=True)
    try:
        if not args.once:
            print("[interplay] running; Ctrl-C stops it", flush=True)
        ok = wait_background(app, say=lambda line: print(f"[interplay] {line}", flush=True))
        if args.once:
            return 0 if ok else 1
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\n[interplay] stopping", flush=True)
    finally:
        stop(app)
        import ray

        ray.shutdown()  # a local cluster of ours ends here, with every process it started
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import ray

    from .app import NAMESPACE, status

    ray.init(address=args.address or "auto", namespace=NAMESPACE, logging_level=logging.ERROR)
    for name, state in status().items():
        print(f"{name:<12} {state}")
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    import ray

    from .app import NAMESPACE, drain

    ray.init(address=args.address or "auto", namespace=NAMESPACE, logging_level=logging.ERROR)
    result = drain(args.actor, undo=args.undo)
    if args.undo:
        print(f"{args.actor}: taking sessions again")
        return 0
    print(f"{args.actor}: draining; moved {len(result['moved'])} session(s), {len(result['failed'])} could not move")
    for sid in result["failed"]:
        print(f"  not moved: {sid}")
    return 1 if result["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="interplay", description="Serve full-duplex interaction models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start a local Ray cluster (or join one) and bring Interplay up")
    serve.add_argument("--config", help="YAML file overriding the embedded defaults")
    serve.add_argument("--address", help="join an existing Ray cluster (e.g. 'auto') instead of starting one")
    serve.add_argument("--host", help="HTTP host (default from config: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port (default from config: 8000)")
    serve.add_argument("--once", action="store_true", help="bring everything up, print status, exit (for checks; 1 if a part was left off)")
    serve.set_defaults(func=cmd_serve)

    dial = sub.add_parser("call", help="call a running Interplay with a WAV file and record the reply", add_help=False)
    dial.set_defaults(func=None)

    ev = sub.add_parser("eval", help="score the model and a VAD harness on held-out dialogues", add_help=False)
    ev.set_defaults(func=None)

    tr = sub.add_parser("train", help="train the model on synthetic dialogues (generated if absent) with Ray Train", add_help=False)
    tr.set_defaults(func=None)

    st = sub.add_parser("status", help="report on a running Interplay")
    st.add_argument("--address", help="Ray address (default: auto)")
    st.set_defaults(func=cmd_status)

    dr = sub.add_parser("drain", help="stop placing sessions on an interaction actor and move its live ones to the others (for an upgrade)")
    dr.add_argument("actor", help="the interaction actor's name, e.g. interaction-0 (see `interplay status`)")
    dr.add_argument("--undo", action="store_true", help="take sessions on it again")
    dr.add_argument("--address", help="Ray address (default: auto)")
    dr.set_defaults(func=cmd_drain)

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["call"]:  # the example client, with its own options
        from examples.call import main as call_main

        return call_main(argv[1:])
    if argv[:1] == ["eval"]:
        from training.evaluate import main as eval_main

        return eval_main(argv[1:])
    if argv[:1] == ["train"]:
        from training.train import main as train_main

        return train_main(argv[1:], prog="interplay train")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
