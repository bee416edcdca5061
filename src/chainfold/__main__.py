from chainfold.cli import main

main()
