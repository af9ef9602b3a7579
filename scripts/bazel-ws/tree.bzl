"""A shell-based rule producing a tree artifact (an output directory).

Remote caches must store and serve whole output directories (REAPI
OutputDirectory / Tree messages), so the e2e workspace includes one.
"""

def _make_tree_impl(ctx):
    out = ctx.actions.declare_directory(ctx.attr.name)
    ctx.actions.run_shell(
        inputs = [ctx.file.src],
        outputs = [out],
        # KEEP IN SYNC with expected/regen.sh.
        command = " ".join([
            "set -eu; export LC_ALL=C;",
            "mkdir -p \"$2/sub/deeper\";",
            "head -n 2 \"$1\" > \"$2/head.txt\";",
            "tail -n 2 \"$1\" > \"$2/tail.txt\";",
            "wc -l < \"$1\" > \"$2/lines.txt\";",
            "sort -r \"$1\" > \"$2/sub/reversed.txt\";",
            "sha256sum < \"$1\" | cut -c1-64 > \"$2/sub/deeper/sha256.txt\";",
            # An empty file, which caches tend to special-case.
            ": > \"$2/sub/empty.txt\"",
        ]),
        arguments = [ctx.file.src.path, out.path],
        # Picks up --action_env (the e2e salt) like genrules do.
        use_default_shell_env = True,
        mnemonic = "MakeTree",
        progress_message = "Making tree %s" % out.short_path,
    )
    return [DefaultInfo(files = depset([out]))]

make_tree = rule(
    implementation = _make_tree_impl,
    attrs = {
        "src": attr.label(allow_single_file = True, mandatory = True),
    },
)
