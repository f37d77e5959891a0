"""One module per CLI command; each defines a click command named ``command``.

The CLI discovers these modules by file name (``merge_experts.py`` -> ``merge-experts``) and
imports one only when it runs, so adding a command touches no other file.
"""
