"""`python tests/no_network.py ARGS...` = `python -m suite ARGS...` with every network attempt refused.

Each attempt (socket connect, create_connection, getaddrinfo) is appended to the file named by
$NO_NETWORK_LOG and then fails with OSError, as on a machine without network. Tests read the log:
an empty log means the command sent no traffic at all.
"""
import os
import runpy
import socket
import sys

LOG = os.environ["NO_NETWORK_LOG"]


def _refuse(name):
    def refuse(*args, **kwargs):
        with open(LOG, "a") as log:
            log.write(f"{name} {args[1:] if name.startswith('socket.') else args}\n")
        raise OSError(f"network attempt refused by tests/no_network.py ({name})")
    return refuse


socket.socket.connect = _refuse("socket.connect")
socket.socket.connect_ex = _refuse("socket.connect_ex")
socket.create_connection = _refuse("create_connection")
socket.getaddrinfo = _refuse("getaddrinfo")
sys.argv = ["suite", *sys.argv[1:]]
runpy.run_module("suite", run_name="__main__", alter_sys=True)
