#!/usr/bin/env python3
"""Opens N idle mutual-TLS connections to a running civgate and reports the server's RSS.

Usage: bench/idle_connections.py --pid PID --addr 127.0.0.1:7443 --certs certs --client registry-hp -n 1000
Each connection completes the TLS handshake (as `client`) and reads the server's HTTP/2
SETTINGS frame, so it is an accepted, established connection; then all are held open while
the server's VmRSS/VmHWM are read from /proc.
"""
import argparse, socket, ssl, time


def rss_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--addr", default="127.0.0.1:7443")
    ap.add_argument("--certs", default="certs")
    ap.add_argument("--client", default="registry-hp")
    ap.add_argument("-n", type=int, default=1000)
    a = ap.parse_args()
    host, port = a.addr.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=f"{a.certs}/ca.pem")
    ctx.load_cert_chain(f"{a.certs}/clients/{a.client}.pem", f"{a.certs}/clients/{a.client}.key")
    ctx.set_alpn_protocols(["h2"])
    before = rss_kib(a.pid, "VmRSS")
    conns = []
    t0 = time.time()
    for _ in range(a.n):
        s = socket.create_connection((host, int(port)))
        t = ctx.wrap_socket(s, server_hostname="localhost")
        t.settimeout(10)
        t.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        if not t.recv(9):
            raise SystemExit("server closed a connection")
        conns.append(t)
    took = time.time() - t0
    time.sleep(1)
    print(f"connections={len(conns)} open_time_s={took:.2f} "
          f"server_rss_before_kib={before} server_rss_with_conns_kib={rss_kib(a.pid, 'VmRSS')} "
          f"server_peak_rss_kib={rss_kib(a.pid, 'VmHWM')}")
    for t in conns:
        t.close()


if __name__ == "__main__":
    main()
