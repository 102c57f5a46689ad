from maskprop_detector.service import main

main()
