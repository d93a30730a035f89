"""Remote mode: an Open Inference Protocol (KServe v2) REST server and client.

    bulkinfer serve --model minilm --port 8000                  # the server (see `serve`)
    p | bulkinfer.BulkInference(model, server="http://127.0.0.1:8000")   # a job that uses it

`import bulkinfer` does not import this package; it loads only when a server or client is used.
"""

from bulkinfer.serve.client import LoadedRemoteModel, RemoteError, RemoteModel, RetryPolicy, V2Client
from bulkinfer.serve.server import ServeConfig, Server, serve, start

__all__ = ["LoadedRemoteModel", "RemoteError", "RemoteModel", "RetryPolicy", "ServeConfig", "Server", "V2Client",
           "serve", "start"]
