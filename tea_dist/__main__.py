"""``python -m tea_dist``: the tea-dist command line."""

from tea_dist.interfaces.cli import main

main()
