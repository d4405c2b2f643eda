# ruff: noqa
import subprocess, sys, time
from benchmarks._plane import control_plane

with control_plane("demo") as (plane, kubeconfig):
    base = [sys.executable, "-m", "kubelock", "--kubeconfig", str(kubeconfig), "--namespace", "demo", "--name", "migrations"]
    procs = [subprocess.Popen(base + ["--id", "web-a", "sleep", "4"], stderr=subprocess.PIPE, text=True)]
    time.sleep(1.5)
    procs.append(subprocess.Popen(base + ["--id", "web-b", "--once", "v2", "true"], stderr=subprocess.PIPE, text=True))
    time.sleep(0.5)
    procs.append(subprocess.Popen(base + ["--id", "web-c", "true"], stderr=subprocess.PIPE, text=True))
    time.sleep(1)
    print(subprocess.run(base + ["--status"], capture_output=True, text=True).stdout)
    print(plane.kubectl("get", "lease", "migrations", "-n", "demo", "-o", "yaml").stdout)
    for p in procs:
        print(p.communicate()[1])
    print(subprocess.run(base + ["--status", "-o", "json"], capture_output=True, text=True).stdout)
