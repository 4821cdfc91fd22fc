"""`python -m sparkloom.models.train CONFIG.json`: one process, or one rank under torchrun."""

from sparkloom.models.train import main

main()
