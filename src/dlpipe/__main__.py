from dlpipe.cli import main

main()
