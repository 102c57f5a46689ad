from maskprop_gateway.app import main

main()
