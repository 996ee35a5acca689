from adapterzoo.cli import main

main()
