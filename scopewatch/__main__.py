from scopewatch.cli import main

main()
