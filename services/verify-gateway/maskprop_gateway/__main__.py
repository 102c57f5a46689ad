from maskprop_gateway.app import main

if __name__ == "__main__":  # not in a child process the gateway spawns (background.py)
    main()
