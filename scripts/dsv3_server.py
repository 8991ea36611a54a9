"""`dsv3 serve` for the client test scripts: started on a free loopback port, ready once /health
answers."""
import socket
import subprocess
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(binary, model_dir, *args):
    """Starts `dsv3 serve --model model_dir`; returns (process, port) once /health answers."""
    port = free_port()
    server = subprocess.Popen([binary, "serve", "--model", model_dir, "--port", str(port), *args],
                              stderr=subprocess.PIPE, text=True)
    for _ in range(400):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return server, port
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise AssertionError("the server did not come up: " + server.stderr.read())
