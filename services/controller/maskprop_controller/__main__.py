from maskprop_controller.service import main

main()
