"""`python -m scan_deploy` runs the command line."""

from scan_deploy.cli import main

main()
