"""Starts a moto server (AWS KMS + STS emulator) on 127.0.0.1, port chosen by
the OS, prints the port, and runs until stdin closes (the test ended)."""
import sys

from moto.server import ThreadedMotoServer

server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
