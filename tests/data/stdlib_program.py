"""A program that uses only the stdlib to start processes (tests/test_install.py runs it
with and without ``python -m spawnd_client run`` and compares the output)."""

import asyncio
import concurrent.futures
import multiprocessing
import os
import subprocess
import sys


def square(x: int) -> int:
    return x * x


async def aio() -> list:
    p = await asyncio.create_subprocess_exec("sh", "-c", "echo aio; exit 3",
                                             stdout=asyncio.subprocess.PIPE)
    out, _ = await p.communicate()
    q = await asyncio.create_subprocess_shell("echo shell", stdout=asyncio.subprocess.PIPE)
    out2, _ = await q.communicate()
    return [out, p.returncode, out2, q.returncode]


def main() -> None:
    res = []
    res.append(subprocess.run(["echo", "hi"], capture_output=True).stdout)
    res.append(subprocess.call(["sh", "-c", "exit 7"]))
    res.append(subprocess.check_output("echo $((6*7))", shell=True))
    res.append(subprocess.getstatusoutput("echo out; exit 2"))
    res.append(subprocess.getoutput("echo got"))
    p = subprocess.Popen(["sleep", "30"])
    p.kill()
    res.append(p.wait())
    res.append(os.system("exit 5"))
    res.append(os.system("kill -9 $$"))
    with os.popen("echo popen") as f:
        res.append(f.read())
    res.append(os.popen("exit 4").close())
    res.append(os.spawnvp(os.P_WAIT, "sh", ["sh", "-c", "exit 6"]))
    pid = os.spawnvp(os.P_NOWAIT, "sh", ["sh", "-c", "exit 9"])
    res.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    res.append(multiprocessing.get_start_method() in ("fork", "spawnd"))
    with multiprocessing.Pool(2) as pool:
        res.append(pool.map(square, range(6)))
    with concurrent.futures.ProcessPoolExecutor(2) as ex:
        res.append(list(ex.map(square, range(4))))
    mpp = multiprocessing.Process(target=square, args=(3,))
    mpp.start()
    mpp.join()
    res.append(mpp.exitcode)
    res.append(asyncio.run(aio()))
    for r in res:
        print(repr(r))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
