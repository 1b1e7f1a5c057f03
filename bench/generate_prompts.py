"""64 chat prompts for ``generate_bench.py``: realistic questions and instructions, from a few words to a few
sentences, in no particular order of length (the runner sorts them into batches by length)."""

PROMPTS = [
    "What is the capital of Australia?",
    "Explain how a refrigerator keeps food cold.",
    "Write a haiku about autumn leaves.",
    "I have chicken, rice, garlic and a bit of spinach in the fridge. What could I cook for dinner tonight "
    "that takes less than thirty minutes?",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "What is the difference between a virus and a bacterium?",
    "My laptop has become very slow over the last few months, especially when I open a web browser. "
    "What are some things I can check or do to speed it up before buying a new one?",
    "Translate 'Good morning, how are you?' into Spanish.",
    "Give me three tips for a job interview.",
    "How many legs does a spider have?",
    "Write a short email to my landlord telling him that the kitchen tap has been leaking since Monday "
    "and asking when someone could come to fix it.",
    "What does the acronym CPU stand for?",
    "Explain the rules of chess to a ten-year-old.",
    "Is it better to rent or to buy a house? Give me the main arguments on both sides.",
    "What causes the seasons on Earth?",
    "Name five fruits that are high in vitamin C.",
    "I am planning a three-day trip to Rome in early spring with two teenagers who love history but get "
    "bored in museums after an hour. Can you suggest a rough plan for each day?",
    "How do I make a good cup of coffee with a French press?",
    "What is photosynthesis?",
    "Write a Python function that returns the largest number in a list.",
    "What are the main differences between Python lists and tuples, and when should I use each one?",
    "Tell me a fun fact about octopuses.",
    "How long should I boil an egg to get a soft yolk?",
    "My friend keeps cancelling our plans at the last minute. I don't want to lose the friendship, but it is "
    "starting to hurt. How could I bring this up with her without sounding angry?",
    "What is the boiling point of water at sea level?",
    "Describe the water cycle in simple terms.",
    "Suggest a name for a small bakery that specializes in sourdough bread.",
    "Why do cats purr?",
    "Explain what inflation is and why central banks try to keep it low.",
    "What should I pack for a weekend hiking trip in the mountains?",
    "Can you explain the difference between weather and climate? My son asked me and I was not sure how to "
    "put it in a way a twelve-year-old would understand.",
    "Who wrote Pride and Prejudice?",
    "Give me a simple recipe for pancakes.",
    "What is a black hole?",
    "List four ways to reduce plastic waste at home.",
    "How does a bill become a law in the United States?",
    "I started running two weeks ago and my knees hurt after every run. I run about five kilometres on "
    "asphalt, three times a week. What might be causing this and what should I change?",
    "What is the largest ocean on Earth?",
    "Write a limerick about a cat who loves cheese.",
    "Explain recursion with a short example.",
    "How do vaccines train the immune system?",
    "What is the speed of light?",
    "Give me a motivational quote for a Monday morning.",
    "Our team of six people keeps missing deadlines because tasks fall through the cracks between meetings. "
    "What simple habits or tools could help us keep track of who is doing what?",
    "What are the symptoms of dehydration?",
    "Compare electric cars and petrol cars in terms of running costs.",
    "How do I convert Celsius to Fahrenheit?",
    "What is the meaning of the word 'serendipity'?",
    "Explain how a bicycle stays upright while moving.",
    "Write a two-sentence horror story.",
    "I need to give a five-minute talk at my sister's wedding. I am nervous about speaking in public. "
    "How should I structure the speech, and how can I calm my nerves on the day?",
    "What is the tallest mountain in the world?",
    "Why do leaves change colour in the autumn?",
    "Recommend three classic science fiction novels.",
    "What is the difference between affect and effect?",
    "How can I improve my sleep?",
    "Explain what a neural network is in one paragraph.",
    "My tomato plants have yellow leaves at the bottom and a few brown spots. They get about six hours of sun "
    "a day and I water them every evening. What is likely wrong?",
    "How many continents are there?",
    "What is the Pythagorean theorem?",
    "Write a thank-you note to a colleague who helped me finish a big project.",
    "What are some good habits for learning a new language?",
    "Why is it important to back up your files?",
]
