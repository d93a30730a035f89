"""`bulkinfer serve`: a model over the Open Inference Protocol (KServe v2 REST)."""

from __future__ import annotations

import argparse
import os
import sys

from bulkinfer.cli.args import _model_args
from bulkinfer.cli.jobs import _served

EPILOG_SERVE = """\
Routes (Open Inference Protocol / KServe v2 REST, JSON or binary tensors):
  GET  /v2/health/live, /v2/health/ready      (never need the token)
  GET  /v2/models/NAME                        metadata: every input and output with its datatype and shape
                                              (minilm: text BYTES [-1] -> embedding FP32 [-1, 384]; digits:
                                              pixels FP32 [-1, 8, 8] -> label INT32 [-1], probs FP32 [-1, 10]);
                                              an infer request sends every input as [N, ...], JSON or binary,
                                              and gets every output back (or those it names in "outputs")
  GET  /v2/models/NAME/ready, /v2/models/NAME/stats
  POST /v2/models/NAME/infer
NAME is the built-in model name (minilm) or the model directory's name; it may be percent-escaped.
Concurrent requests are merged into one model call (dynamic batching).
Limits: a body over --max-request-bytes gets 413 unread; a body not all received --body-timeout-s after
its headers gets 408; past --max-connections a new connection gets 503 with Retry-After.
SIGTERM or Ctrl-C stops accepting connections, finishes the requests in flight and exits 0.

Examples:
  bulkinfer serve --model minilm --port 8000
  BULKINFER_TOKEN=s3cret bulkinfer serve --model minilm --host 0.0.0.0
  curl -s localhost:8000/v2/models/minilm/infer \\
    -d '{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hello"]}]}'
  bulkinfer serve --model digits --port 8001
  curl -s localhost:8001/v2/models/digits/infer \\
    -d '{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 8, 8], "data": [0, 0, 5, ...]}]}'
"""


def _serve_parser(sub) -> argparse.ArgumentParser:
    serve = sub.add_parser(
        "serve", help="serve a model over the Open Inference Protocol (KServe v2 REST)",
        description="Serve a model to remote jobs and any v2 client (tritonclient, KServe, curl).",
        epilog=EPILOG_SERVE, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(serve)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 for the network)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000; 0 picks a free one)")
    serve.add_argument("--token", default=None,
                       help="require 'Authorization: Bearer TOKEN' on every route but health (default: $BULKINFER_TOKEN)")
    serve.add_argument("--max-queue-delay-ms", type=float, default=5.0,
                       help="how long a request may wait for others to share its model call (default: 5)")
    serve.add_argument("--max-batch-rows", type=int, default=1024, help="rows per model call, at most (default: 1024)")
    serve.add_argument("--max-request-bytes", type=int, default=64 << 20,
                       help="larger request bodies get 413, unread (default: 64 MiB)")
    serve.add_argument("--max-connections", type=int, default=512,
                       help="connections served at once, idle keep-alive ones included; one more gets 503 "
                            "with Retry-After (default: 512)")
    serve.add_argument("--body-timeout-s", type=float, default=60.0,
                       help="a request body not all received this many seconds after its headers gets 408, "
                            "however slowly it trickles (default: 60)")
    serve.add_argument("-v", "--verbose", action="store_true", help="log every request")
    return serve


def _serve(args) -> int:
    from bulkinfer.models import CheckpointError
    from bulkinfer.serve import ServeConfig, serve

    try:
        config = ServeConfig(host=args.host, port=args.port, token=args.token or os.environ.get("BULKINFER_TOKEN"),
                             max_queue_delay_ms=args.max_queue_delay_ms, max_batch_rows=args.max_batch_rows,
                             max_request_bytes=args.max_request_bytes, max_connections=args.max_connections,
                             body_timeout_s=args.body_timeout_s)
        return serve(_served(args), config)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"bulkinfer serve: error: {e}", file=sys.stderr)
        return 2
