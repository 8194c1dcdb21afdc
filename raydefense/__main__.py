from raydefense.cli import main

main()
