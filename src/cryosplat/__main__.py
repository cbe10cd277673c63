from cryosplat.cli import main

main()
