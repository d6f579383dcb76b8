from cosine.cli import main

main()
