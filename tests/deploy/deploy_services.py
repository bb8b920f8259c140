"""Real services for the deploy tests, on loopback and free ports: nginx running the router rule of
deploy/nginx/famserve.conf in front of given replica ports. A plain module, importable by name (see
deploy_files.py)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from deploy_files import DEPLOY
from server_process import free_port
from services import require_binary, stop_process, wait_listening

NGINX_CONF = DEPLOY / "nginx" / "famserve.conf"


class NginxRouter:
    """nginx with deploy/nginx/famserve.conf as written, except what only makes sense inside compose: the replica
    host names become the given loopback ports (and lose `resolve`, which nginx < 1.27.3 lacks), Docker's resolver
    line goes, and it listens on a free port. `url` is the router's base URL."""

    def __init__(self, tmp_path: Path, replica_ports: dict[str, int]) -> None:
        nginx = require_binary("nginx", "nginx-light")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / "error.log"

        def loopback(match: re.Match[str]) -> str:
            return f"server 127.0.0.1:{replica_ports[match.group(1)]}"

        conf = re.sub(r"server (famserve-\d+):8000 resolve", loopback, NGINX_CONF.read_text())
        conf = re.sub(r"^resolver .*$", "", conf, flags=re.MULTILINE)
        conf = conf.replace("listen 80;", f"listen 127.0.0.1:{self.port};")
        (tmp_path / "famserve.conf").write_text(conf)
        temp_paths = " ".join(f"{kind}_temp_path {tmp_path / kind};"
                              for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (tmp_path / "nginx.conf").write_text(
            f"daemon off;\nworker_processes 1;\npid {tmp_path / 'nginx.pid'};\nerror_log {self.log_path};\n"
            f"events {{}}\nhttp {{\n  access_log off;\n  {temp_paths}\n  include {tmp_path / 'famserve.conf'};\n}}\n")
        self.process = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_listening(self.process, self.port, "nginx")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}:\n{self.log_path.read_text() if self.log_path.exists() else ''}") from None

    def stop(self) -> None:
        stop_process(self.process)
