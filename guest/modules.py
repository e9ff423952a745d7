#!/usr/bin/env python3
"""Kernel modules for a guest, in load order (used by guest/build.sh and guest/build-igb.sh).

    modules.py MODDIR KCONFIG OUTDIR LOG GROUP=name:CONFIG_X,name:CONFIG_Y [GROUP=...]

MODDIR is an extracted /lib/modules/<kver>, KCONFIG the kernel's config. For each group, in the
order given: every wanted module whose CONFIG_ is =m, with its dependencies first (each .ko's
`depends=` and the `pre:` modules of its `softdep=`), skipping what is built in (=y or in
modules.builtin) and what an earlier group already loads; the .ko files are copied to OUTDIR
and the load order written to OUTDIR/<GROUP>.order. A wanted CONFIG_ that is neither =y nor =m,
a module missing from the package or a dependency cycle is an error. LOG prefixes the lines
on stderr that name each group's modules.
"""
import os
import re
import shutil
import sys


def main(argv):
    if len(argv) < 5:
        sys.exit(__doc__)
    moddir, kconfig, out, log = argv[:4]
    groups = []
    for spec in argv[4:]:
        group, _, wanted = spec.partition("=")
        groups.append((group, [tuple(w.split(":", 1)) for w in wanted.split(",") if w]))
    config = {}
    for line in open(kconfig):
        m = re.match(r"(CONFIG_\w+)=(.*)", line)
        if m:
            config[m.group(1)] = m.group(2)
    builtin = {os.path.basename(l.strip())[:-3].replace("-", "_")
               for l in open(os.path.join(moddir, "modules.builtin"))}
    path = {}
    for root, _, files in os.walk(os.path.join(moddir, "kernel")):
        for f in files:
            if f.endswith(".ko"):
                path[f[:-3].replace("-", "_")] = os.path.join(root, f)

    def info(name):
        d = open(path[name], "rb").read()
        dep = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", d)
        soft = re.search(rb"(?:^|\x00)softdep=([^\x00]*)\x00", d)
        deps = [x.replace("-", "_") for x in (dep.group(1).decode().split(",") if dep else []) if x]
        pre = []
        if soft:  # "pre: a b post: c" -> the pre: ones that are module names we have
            mode = None
            for tok in soft.group(1).decode().split():
                if tok.endswith(":"):
                    mode = tok[:-1]
                elif mode == "pre" and tok.replace("-", "_") in path:
                    pre.append(tok.replace("-", "_"))
        return pre + deps

    loaded = set()
    for group, wanted in groups:
        order = []

        def visit(n, stack=()):
            if n in loaded or n in order or n in builtin:
                return
            if n not in path:
                sys.exit(f"module {n} not found in the kernel package")
            if n in stack:
                sys.exit(f"dependency cycle at {n}")
            for d in info(n):
                visit(d, stack + (n,))
            order.append(n)

        for name, cfg in wanted:
            val = config.get(cfg)
            if val == "y":
                continue
            if val != "m":
                sys.exit(f"{cfg} is neither built in nor a module ({val!r})")
            visit(name)
        for n in order:
            shutil.copy(path[n], os.path.join(out, n + ".ko"))
        loaded.update(order)
        with open(os.path.join(out, group + ".order"), "w") as fh:
            fh.write("".join(n + "\n" for n in order))
        print(f"{log}   modules {group}: {' '.join(order) or '(built in)'}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
