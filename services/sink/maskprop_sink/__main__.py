from maskprop_sink.service import main

main()
