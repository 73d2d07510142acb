"""``python -m tea_dist``: the tea-dist command line."""

from tea_dist.cli import main

main()
